"""Filter pruning (NNCF ``filter_pruning``): whole output channels masked while training,
physically removed by ``strip``. NNCF 2.17's results are the default (tests/fixtures/nncf217/
pruning.json; the deliberate differences are in docs/nncf_differences.md).

The groups of coupled channels come from :mod:`compress.pruning.channel_groups` (Torch-Pruning's
dependency graph; on residual models they are NNCF's clusters) and are built once, at
construction, where the model is pruned at ``pruning_init`` as NNCF does. At every epoch start
the level comes from NNCF's pruning schedule, every group is scored by ``filter_importance``
(per-layer weight scores summed over the layers that produce its channels), and the lowest
channels are masked: every group at the level with its kept count rounded up to ``round_to``
(``uniform``, NNCF's default), or under one threshold on scores of normalised weights
(``global``, NNCF's ``all_weights``), or after a SLAMP ranking (``slamp``); ``rounding`` says
how counts are rounded, and one channel always remains. At epoch ``num_init_steps +
pruning_steps`` (``baseline``: ``num_init_steps``) the masks freeze. ``strip`` removes the masked
channels and attaches the plan of kept channels that the ``pruned`` export writes.

With ``pruning_flops_target`` the schedule moves the fraction of MACs to remove, found as NNCF
finds it: the filter ratio by bisection (uniform) or filters pruned one at a time in ranking
order (global), on MACs counted from the kept widths. With ``pruning_latency_target`` it moves
the fraction of measured latency to remove, and the widths come from a latency table measured
once on this machine (:mod:`compress.pruning.latency`), calibrated on the whole model timed
shrunk uniformly (:mod:`compress.pruning.latency_calibration`); a sharded model's table is
measured on rank 0 alone, on the model gathered there, and sent to every rank.

With ``filter_importance: scop`` the scores are control coefficients learned against knockoff
features during the ``num_init_steps`` epochs (:mod:`compress.pruning.scop`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from compress import distributed, masks
from compress.algorithm import (
    Algorithm,
    check_flag,
    check_fraction,
    check_tensor_table,
    weight,
    weight_layers,
)
from compress.analysis.outputs import on_device
from compress.analysis.summary import layer_macs
from compress.analysis.untouched import copy_model
from compress.errors import CompressError, ConfigError
from compress.pruning import (
    flops_target,
    hf_layers,
    latency,
    latency_calibration,
    latency_widths,
    moe,
)
from compress.pruning.allocation import global_counts, global_keep, kept_count, top
from compress.pruning.calibration import nuclear_scores
from compress.pruning.channel_groups import Excluded, build_groups
from compress.pruning.coverage import (
    FLAGS,
    check_reachable,
    coverage_warning,
    exclusion_rows,
)
from compress.pruning.hf_config import config_warning, unstated, update_config, widths
from compress.pruning.importance import FILTER_IMPORTANCE, group_scores
from compress.pruning.layer_choices import layer_choices
from compress.pruning.scop import Scop
from compress.pruning.sizes import distinct_numel, shrunk_numel
from compress.pruning.structured import (
    ChannelGroup,
    Member,
    apply_channel_mask,
    pruning_plan,
    round_keep,
    shrink,
)
from compress.recipe import scopes
from compress.schedules import pruning_level

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_ROUNDING = {"uniform": "up", "global": "none", "slamp": "nearest"}
"""How kept counts are rounded when the recipe does not say: as NNCF 2.17 for uniform (up to a
multiple of round_to) and all_weights (not at all); slamp, ours, to the nearest multiple."""


class FilterPruning(Algorithm):
    name = "filter_pruning"

    def __init__(self, model, cfg, scheduler, example_inputs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, cfg, scheduler, example_inputs)
        if example_inputs is None:
            raise ConfigError(
                f"{cfg.path}: filter_pruning traces the model to find coupled channels and "
                "needs example inputs: pass example_inputs to create_compressed_model or set "
                "input_info in the recipe"
            )
        p = self.params
        weight_layers(model, cfg)  # a ConfigError when no conv or linear layer is in scope
        sharded = any(distributed.is_sharded(t) for t in model.parameters())
        # what is traced (channel groups, MACs): a sharded model's structure on the meta
        # device, since DTensors cannot be traced
        structure = distributed.meta_copy(model) if sharded else model
        traced = on_device(example_inputs, "meta") if sharded else example_inputs
        self.groups = self._build_groups(structure, traced, validate=not sharded)
        self.init = float(cfg.options["pruning_init"])
        self.flops_target = p.get("pruning_flops_target")
        self.latency_target = p.get("pruning_latency_target")
        self.latency_table: dict[str, Any] | None = None  # measured when first needed
        self.target = float(self.flops_target or self.latency_target or p["pruning_target"])
        steps = 0 if p["schedule"] == "baseline" else p["pruning_steps"]
        self.freeze_epoch = p["num_init_steps"] + steps
        self.rounding = p.get("rounding") or _ROUNDING[p["allocation"]]
        self.explicit, self.ratios = layer_choices(model, self._layers(), p, f"{cfg.path}.params")
        self.keep = {g.name: torch.ones(g.size, dtype=torch.bool) for g in self.groups}
        self.current = 0.0
        self.ratio = 0.0  # the filter ratio of the scored groups; differs from level for FLOPs
        self.frozen = False
        self.calibration: dict[str, torch.Tensor] | None = None
        # counted in the trace's forward pass; a model it could not run is counted on its own
        macs = self.traced_macs or layer_macs(structure, traced)
        del structure
        self.full_macs = macs.get("", sum(macs.values()))
        self.layer_macs = {n: macs.get(n, 0) for n in self._weight_layers()}
        # the model's own parameters, those of its state_dict: RB's logits (added before or
        # after this algorithm) are not
        in_state = set(model.state_dict(keep_vars=True))
        self.own_params = {
            n for n, _ in model.named_parameters(remove_duplicate=False) if n in in_state
        }
        self.full_params = sum(
            p.numel() for n, p in model.named_parameters() if n in self.own_params
        )
        # NNCF counts the filters of every conv and linear layer, prunable or not
        self.full_filters = sum(
            weight(m).shape[0] for m in model.modules() if isinstance(m, _LAYERS)
        )
        self.rounded_whole: list[str] = []  # groups whose rounding keeps every channel now
        # mixture-of-experts widths: not traced groups, pruned by compress.pruning.moe
        self.experts = moe.build(model, cfg.options, p, macs, self.excluded, path=cfg.path)
        self._check_coverage()
        self.scop = self._scop()
        self.reach_checked = False  # whether the latency target was checked against the table
        self.update(False)

    # --- construction ----------------------------------------------------------------------

    def _build_groups(
        self, structure: nn.Module, inputs: tuple[torch.Tensor, ...], *, validate: bool
    ) -> list[ChannelGroup]:
        """Groups whose producers the scopes allow; the others stay whole. ``structure`` is
        the model to trace (a meta copy of a sharded model, where the numerical check of the
        groups, which runs the model, is left out: ``validate`` False)."""
        opts, p = self.cfg.options, self.params
        self.excluded: list[Excluded] = []
        self.traced_macs: dict[str, int] = {}
        kinds = _LAYERS + hf_layers.matrix_layer_types(self.model)  # GPT-2's Conv1D
        allowed = scopes.select(
            self.model,
            kinds,
            ignored=opts.get("ignored_scopes"),
            target=opts.get("target_scopes"),
            validate=opts.get("validate_scopes", True),
            path=self.cfg.path,
        )
        names = {n for n, _ in allowed}
        ignored = [n for n, m in self.model.named_modules() if isinstance(m, kinds)]
        groups = build_groups(
            structure,
            inputs,
            ignored=[n for n in ignored if n not in names],
            prune_first_conv=p["prune_first_conv"],
            prune_downsample_convs=p["prune_downsample_convs"],
            prune_batch_norms=p["prune_batch_norms"],
            time_budget=p.get("trace_time_budget"),
            validate=validate,
            excluded=self.excluded,
            macs=self.traced_macs,
        )
        if p["prune_beyond_config"]:
            return groups
        # a Hugging Face model prunes what its config states, so save_pretrained rebuilds it
        cannot = set(unstated(self.model, [g.name for g in groups]))
        for name in sorted(cannot):
            detail = "its config cannot state the pruned width (save_pretrained would not rebuild)"
            self.excluded.append(Excluded(name, "config", detail))
        return [g for g in groups if g.name not in cannot]

    def _check_coverage(self) -> None:
        """Groups that rounding keeps whole at the target level join ``excluded``; a recipe
        that can prune nothing is a ConfigError, one that leaves groups whole a warning."""
        round_to = self.params["round_to"]
        for g in self.groups:
            n = g.size - math.floor(self.target * g.size + 1e-9)
            whole = kept_count(g.size, self.target, round_to, unit=g.unit, rounding=self.rounding)
            uniform = self.params["allocation"] == "uniform" and not self.flops_target
            if uniform and n < g.size and whole == g.size:
                detail = f"{g.size * g.unit} channels with round_to {round_to} keep all"
                self.excluded.append(Excluded(g.name, "rounding", detail))
        rounded = {e.group for e in self.excluded if e.kind == "rounding"}
        fixed = set(self.explicit) | set(self.ratios)
        reachable = [g for g in self.groups if g.name not in rounded or g.name in fixed]
        check_reachable(self.cfg.path, len(reachable) + len(self.experts.names), self.excluded)
        self.macs_share, self.params_share = self._removable()
        message = coverage_warning(self.macs_share, self.params_share, self.excluded)
        if message:
            warnings.warn(message, stacklevel=5)
        # a Hugging Face config that cannot state the pruned widths: said before training
        message = config_warning(self.model, [g.name for g in reachable])
        if message:
            warnings.warn(message, stacklevel=5)

    def _removable(self) -> tuple[float, float]:
        """The share of MACs and params that pruning every group down to one channel removes."""
        least = {g.name: torch.arange(g.size) == 0 for g in self.groups} | moe.least(self.experts)
        macs, params = self.macs_params(least)
        return (
            1.0 - macs / self.full_macs if self.full_macs else 0.0,
            1.0 - params / self.full_params if self.full_params else 0.0,
        )

    def _layers(self) -> dict[str, tuple[ChannelGroup, Member]]:
        """Every prunable layer: its group and its out-dim weight slice."""
        return {
            m.module_name: (g, m)
            for g in self.groups
            for m in g.members
            if m.role == "producer" and m.param_name == "weight"
        }

    def _weight_layers(self) -> list[str]:
        names = {m.module_name for g in self.groups for m in g.members if m.param_name == "weight"}
        kinds = _LAYERS + hf_layers.matrix_layer_types(self.model)
        return sorted(n for n in names if isinstance(self.model.get_submodule(n), kinds))

    def _weight(self, layer: str) -> torch.Tensor:
        """The layer's weight parameter, unmasked (outside the forward pass)."""
        return weight(self.model.get_submodule(layer))

    def _scop(self) -> Scop | None:
        """The knockoff phase that learns the scores of ``filter_importance: scop``."""
        p = self.params
        if p["filter_importance"] != "scop":
            return None
        return Scop(
            self.model,
            self.groups,
            self.scheduler,
            epochs=p["num_init_steps"],
            knockoff=p["scop_knockoff"],
            freeze_weights=p["scop_freeze_weights"],
            lr=p["scop_lr"],
            path=f"{self.cfg.path}.params",
        )

    # --- schedule ------------------------------------------------------------------------------

    @property
    def level(self) -> float:
        """The scheduled level: a fraction of filters, or of MACs with pruning_flops_target."""
        return self.current

    def _scheduled(self, target: float, epoch: float) -> float:
        params = {**self.params, "pruning_target": target}
        return pruning_level(params, self.init, epoch)

    def update(self, per_step: bool) -> None:
        if self.scop is not None:
            self.scop.update(per_step)  # ends the knockoff phase before the first scores
        # NNCF moves filter pruning once per epoch; steps only train the current masks.
        if per_step or self.frozen:
            return
        epoch = self.scheduler.progress(None, False)
        if self.latency_target and self.scheduler.epoch >= 0 and not self.reach_checked:
            self._check_latency_reach()
        if self.scheduler.epoch < 0 and self.scop is None and not self.latency_target:
            # NNCF prunes at pruning_init when built, before the first epoch_step (SCOP and
            # latency targets, ours, start from the schedule's first epoch as before)
            self._move(self.init, epoch)
            return
        self._move(self._scheduled(self.target, epoch), epoch)
        if self.scheduler.epoch >= 0 and epoch >= self.freeze_epoch:
            self.frozen = True

    def set_level(self, level: float) -> None:
        """Moves to ``level`` now, outside the schedule (accuracy-aware training), with the
        allocation of the schedule's last epoch."""
        self._move(level, float(max(self.freeze_epoch, self.params["num_init_steps"])))

    def _move(self, level: float, epoch: float) -> None:
        """Keeps the channels ``level`` (of filters, MACs or latency) leaves at ``epoch``."""
        self.current = level
        scores = self.scores()
        if self.latency_target:
            self.keep = self._latency_keep(level, scores, epoch)
            self.ratio = self._filter_ratio(self.keep)
        elif self.flops_target and self.params["allocation"] == "global":
            self.keep = self._flops_keep(level, scores, epoch)
            self.ratio = self._filter_ratio(self.keep)
        else:
            self.ratio = self._flops_ratio(level, scores, epoch) if self.flops_target else level
            self.keep = self.choose(self.ratio, scores, epoch)
        moe.choose(self.model, self.experts, self.ratio, self.params, self.rounding)
        self._apply()

    def _filter_ratio(self, keep: Mapping[str, torch.Tensor]) -> float:
        """The share of the groups' channels ``keep`` drops."""
        kept = sum(int(keep[g.name].sum()) for g in self.groups)
        return 1.0 - kept / max(1, sum(g.size for g in self.groups))

    def _apply(self) -> None:
        for group in self.groups:
            apply_channel_mask(self.model, group, self.keep[group.name])
        moe.apply(self.model, self.experts)

    # --- importance and allocation ---------------------------------------------------------

    @property
    def needs_calibration(self) -> bool:
        """Whether the criterion reads feature maps, so ``calibrate`` should get real batches."""
        return self.params["filter_importance"] == "nuclear_norm"

    def scores(self) -> dict[str, torch.Tensor]:
        """One score per channel of every group; nuclear_norm falls back on the example inputs
        until ``calibrate`` has seen data."""
        criterion = self.params["filter_importance"]
        if criterion == "nuclear_norm":
            if self.calibration is None:
                inputs = [self.example_inputs]
                self.calibration = nuclear_scores(self.model, self.groups, inputs)  # type: ignore[arg-type]
            return self.calibration
        if self.scop is not None:
            return self.scop.scores(self.groups)
        return group_scores(self.model, self.groups, criterion)

    def calibrate(self, batches: Iterable[torch.Tensor | tuple[torch.Tensor, ...]]) -> None:
        """Scores channels by the nuclear norm of their feature maps over ``batches`` (model
        inputs: a tensor, or a tuple passed as positional arguments). The next epoch's masks
        use them. Under torch.distributed the scores are summed over ranks, so every rank agrees.

        Example:
            >>> ctrl.algorithms[0].calibrate(x for x, _ in islice(loader, 4))  # doctest: +SKIP
        """
        scores = nuclear_scores(self.model, self.groups, batches)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for s in scores.values():
                torch.distributed.all_reduce(s)
        self.calibration = scores

    def choose(
        self, ratio: float, scores: Mapping[str, torch.Tensor], epoch: float
    ) -> dict[str, torch.Tensor]:
        """Keep masks of every group with the scored groups at ``ratio``."""
        round_to = self.params["round_to"]
        started = epoch >= self.params["num_init_steps"]
        keep = {}
        fixed = {**self.explicit, **self.ratios}
        scored = [g for g in self.groups if g.name not in fixed]
        allocation = self.params["allocation"]
        self.rounded_whole = []
        if allocation == "global":
            keep = global_keep(scored, self._ranking_scores(scored, scores), ratio, round_to)
        if allocation == "slamp":
            counts = global_counts(scored, scores, ratio, slamp=True)
        for g in scored:
            if allocation == "uniform":
                unrounded = g.size - math.floor(ratio * g.size + 1e-9)
                n = kept_count(g.size, ratio, round_to, unit=g.unit, rounding=self.rounding)
            else:
                unrounded = counts[g.name] if allocation == "slamp" else int(keep[g.name].sum())
                n = self._rounded(g, unrounded)
                if allocation == "global" and n == unrounded:
                    continue  # NNCF's threshold mask, kept as it is
            if n == g.size > unrounded:
                self.rounded_whole.append(g.name)
            keep[g.name] = top(scores[g.name], n)
        for name, target in self.ratios.items():
            g = next(g for g in self.groups if g.name == name)
            level = self._scheduled(target, epoch)
            n = kept_count(g.size, level, round_to, unit=g.unit, rounding=self.rounding)
            keep[name] = top(scores[name], n)
        for name, k in self.explicit.items():
            keep[name] = k.clone() if started else torch.ones_like(k)
        return keep

    def _rounded(self, group: ChannelGroup, n: int) -> int:
        """A kept count of a ranking allocation, rounded as the recipe says (``none``: as is)."""
        round_to = self.params["round_to"]
        if self.rounding == "nearest":
            return round_keep(group.size, n, round_to, group.unit)
        if self.rounding == "up":
            step = round_to // math.gcd(round_to, group.unit) if round_to > 1 else 1
            return min(max(math.ceil(n / step) * step, 1), group.size)
        return n

    def _ranking_scores(
        self, groups: list[ChannelGroup], scores: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Scores comparable across groups: the criterion on weights divided by their L2 norm
        (NNCF's all_weights), or data-dependent scores divided by their group's L2 norm."""
        criterion = self.params["filter_importance"]
        if criterion in FILTER_IMPORTANCE:
            return group_scores(self.model, groups, criterion, normalise=True)
        out = {}
        for g in groups:
            norm = scores[g.name].float().norm()
            out[g.name] = scores[g.name].float() / norm if norm > 0 else scores[g.name].float()
        return out

    # --- FLOPs -----------------------------------------------------------------------------------

    def macs_params(self, keep: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        """(MACs, params) of the model ``strip`` would build with ``keep``, counted from the
        kept widths (equal to ``count_macs_params`` of the shrunk model, at no tracing cost)."""
        numel = {
            k: n if k in self.own_params else 0
            for k, n in shrunk_numel(self.model, self.groups, keep).items()
        }
        experts, saved = moe.sizes(self.experts, keep)
        numel |= experts
        for name, macs in self.layer_macs.items():
            saved += macs * (1.0 - numel[f"{name}.weight"] / self._weight(name).numel())
        return round(self.full_macs - saved), distinct_numel(self.model, numel)

    def _flops_ratio(
        self, fraction: float, scores: Mapping[str, torch.Tensor], epoch: float
    ) -> float:
        """The filter ratio that removes ``fraction`` of the MACs, as NNCF's uniform search
        finds it; a warning when even ratio 1 falls short (NNCF raises)."""
        if fraction <= 0.0:
            return 0.0

        def macs(ratio: float) -> int:
            experts = moe.counted(self.experts, ratio, self.params, self.rounding)
            return self.macs_params(self.choose(ratio, scores, epoch) | experts)[0]

        ratio = flops_target.uniform_ratio(macs, self.full_macs * (1.0 - fraction))
        self._warn_short(fraction, macs(ratio))
        return ratio

    def _flops_keep(
        self, fraction: float, scores: Mapping[str, torch.Tensor], epoch: float
    ) -> dict[str, torch.Tensor]:
        """Keep masks that remove ``fraction`` of the MACs, as NNCF's all_weights search finds
        them (filters pruned one at a time in ranking order)."""
        keep = self.choose(0.0, scores, epoch)
        fixed = {**self.explicit, **self.ratios}
        scored = [g for g in self.groups if g.name not in fixed]
        if fraction <= 0.0 or not scored:
            return keep
        ranking = self._ranking_scores(scored, scores)
        order = flops_target.ranking_order(
            [g.size for g in scored], [ranking[g.name].tolist() for g in scored]
        )

        def pruned(n: int) -> dict[str, torch.Tensor]:
            out = {**keep, **{g.name: torch.ones(g.size, dtype=torch.bool) for g in scored}}
            for i, c in order[:n]:
                out[scored[i].name][c] = False
            return out

        def macs(n: int) -> int:
            keep = pruned(n)
            ratio = self._filter_ratio(keep)
            experts = moe.counted(self.experts, ratio, self.params, self.rounding)
            return self.macs_params(keep | experts)[0]

        n = flops_target.shortest_prefix(len(order), macs, self.full_macs * (1.0 - fraction))
        self._warn_short(fraction, macs(n))
        return pruned(n)

    def _warn_short(self, fraction: float, macs: int) -> None:
        if macs > self.full_macs * (1.0 - fraction):
            removed = 1.0 - macs / self.full_macs if self.full_macs else 0.0
            warnings.warn(
                f"{self.cfg.path}: pruning_flops_target {fraction:.3f} is out of reach; the "
                f"most pruning allowed removes {removed:.3f} of the MACs (NNCF 2.17 raises "
                "here; this run goes on with that)",
                stacklevel=3,
            )

    # --- latency ---------------------------------------------------------------------------

    def latency(self) -> dict[str, Any]:
        """The latency table (measured on first use, on an unmasked copy of the model), with
        its calibration on the whole model (:mod:`compress.pruning.latency_calibration`).
        Under a process group (DDP or FSDP2) rank 0 alone measures it (a sharded model gathered
        whole there once and freed after) and every rank gets rank 0's table, so all choose the
        same widths. A table from a loaded state is used as it is."""
        if self.latency_table is None:
            whole = self._unmasked_copy()
            self.latency_table = distributed.from_rank_zero(lambda: self._measured(whole))
            del whole
        return self.latency_table

    def _measured(self, model: nn.Module) -> dict[str, Any]:
        """The latency table of ``model`` (an unmasked copy), calibrated; the example inputs
        moved to its device."""
        inputs = on_device(tuple(self.example_inputs or ()), next(model.parameters()).device)
        batch = self.params.get("latency_batch_size")
        backend = self.params.get("latency_backend", "torch")
        table = latency.measure_table(model, self.groups, inputs, batch_size=batch, backend=backend)
        table["calibration"] = latency_calibration.calibrate(
            model,
            self.groups,
            inputs,
            table,
            batch_size=batch,
            backend=backend,
            fixed=self._fixed_widths(),
            flagged=self._flagged_groups(model),
        )
        return table

    def _fixed_widths(self) -> dict[str, int]:
        """Widths of the groups prune_channels or layer_ratios set (not the latency target)."""
        fixed = {n: int(k.sum()) for n, k in self.explicit.items()}
        for name, ratio in self.ratios.items():
            g = next(g for g in self.groups if g.name == name)
            round_to = self.params["round_to"]
            fixed[name] = kept_count(g.size, ratio, round_to, unit=g.unit, rounding=self.rounding)
        return fixed

    def _flagged_groups(self, model: nn.Module) -> tuple[list[ChannelGroup], list[str]] | None:
        """The groups ``model`` has with the flags that keep its first conv and downsample
        convs whole turned on, and those flags (None when none keeps a group whole here)."""
        kinds = {e.kind for e in self.excluded} & {"first conv", "downsample conv"}
        if not kinds:
            return None
        p = self.params
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = build_groups(
                model,
                self.example_inputs,  # type: ignore[arg-type]
                prune_first_conv=True,
                prune_downsample_convs=True,
                prune_batch_norms=p["prune_batch_norms"],
                time_budget=p.get("trace_time_budget"),
            )
        return groups, sorted(FLAGS[k] for k in kinds)

    def _check_latency_reach(self) -> None:
        """At the first epoch, before any training step (the table is measured then, or comes
        from a loaded state, never twice): a warning when the flags leave too little to prune
        for the latency target, with the most reachable target."""
        self.reach_checked = True
        target = float(self.latency_target or 0.0)
        table = self.latency()
        if "calibration" in table:
            message = latency_calibration.reach_warning(table, target)
        else:  # a table from before calibrations
            flags = sorted({FLAGS[e.kind] for e in self.excluded if e.kind in FLAGS})
            message = latency_widths.reach_warning(table, target, self._fixed_widths(), flags)
        if message:
            warnings.warn(f"{self.cfg.path}: {message}", stacklevel=4)

    def _latency_keep(
        self, fraction: float, scores: Mapping[str, torch.Tensor], epoch: float
    ) -> dict[str, torch.Tensor]:
        """Keep masks whose widths remove ``fraction`` of the whole model's measured latency
        (the table's fraction read off its calibration); groups set by prune_channels or
        layer_ratios keep their own widths."""
        keep = self.choose(0.0, scores, epoch)
        if fraction <= 0.0:
            return keep
        table = self.latency()
        fixed = {n: int(keep[n].sum()) for n in {**self.explicit, **self.ratios}}
        free = {g.name: scores[g.name] for g in self.groups if g.name not in fixed}
        cap = None
        wanted: float | None = fraction
        if "calibration" in table:
            cap = latency_calibration.MARGIN_CAP
            wanted = latency_calibration.checked_fraction(table, fraction)
        if wanted is None:  # out of reach: every group at its narrowest, as its reach measured
            narrowest = latency_calibration.uniform_widths(table, 0.0, fixed)
            chosen = {g: w for g, w in narrowest.items() if g in free}
        else:
            chosen = latency_widths.choose_widths(table, free, wanted, fixed, margin_cap=cap)
            # the final target's choice: the whole model timed, the choice corrected
            final = abs(fraction - float(self.latency_target or 0.0)) < 1e-9
            whole: nn.Module | None = None  # the unmasked model the checks time, made once
            while cap is not None and final and not latency_calibration.settled(table, fraction):
                if whole is None:
                    whole = self._unmasked_copy()
                self._check_choice(whole, table, {**fixed, **chosen}, fraction, wanted)
                wanted = latency_calibration.checked_fraction(table, fraction)
                assert wanted is not None  # checked: a fraction read off the curve
                chosen = latency_widths.choose_widths(table, free, wanted, fixed, margin_cap=cap)
        for name, width in chosen.items():
            keep[name] = top(scores[name], width)
        reached = latency_calibration.removed_fraction(table, {**fixed, **chosen})
        if wanted is None or not latency_widths.target_holds(
            table, {**fixed, **chosen}, wanted, margin_cap=cap
        ):
            measured = "the whole model measured" if "calibration" in table else "the table"
            warnings.warn(
                f"{self.cfg.path}: pruning_latency_target {fraction:.3f} is out of reach; at "
                f"the narrowest widths {measured} {1 / (1 - reached):.2f}x ({reached:.3f} of its "
                "latency removed)",
                stacklevel=2,
            )
        elif "calibration" in table and (
            message := latency_calibration.check_warning(table, fraction)
        ):
            warnings.warn(f"{self.cfg.path}: {message}", stacklevel=2)
        return keep

    def _unmasked_copy(self) -> nn.Module:
        """The model without its masks, as the table times it, on rank 0 (a sharded model
        gathered whole there and moved to its shards' device); an empty module on the other
        ranks of a process group, which time nothing."""
        param = next(self.model.parameters())
        if distributed.is_sharded(param):
            model = distributed.unsharded_copy(self.model)  # every rank takes part
            if model is not None:
                model = model.to(distributed.local(param).device)
        elif dist.is_initialized() and dist.get_rank() != 0:
            model = None
        else:
            model = copy_model(self.model)
        if model is None:
            return nn.Module()
        for module in model.modules():
            masks.remove(module)
        return model

    def _check_choice(
        self,
        model: nn.Module,
        table: dict[str, Any],
        widths: Mapping[str, int],
        fraction: float,
        wanted: float,
    ) -> None:
        """Times the whole model at ``widths`` beside it at full width (``model``: the unmasked
        copy) and keeps the check in the calibration (:func:`latency_calibration.check`).
        Under a process group rank 0 alone times it; every rank keeps rank 0's checks, so all
        choose the same widths next."""

        def checked() -> list[dict[str, Any]]:
            latency_calibration.check(
                model,
                self.groups,
                on_device(tuple(self.example_inputs or ()), next(model.parameters()).device),
                table,
                widths,
                fraction,
                wanted,
                batch_size=self.params.get("latency_batch_size"),
                backend=self.params.get("latency_backend", "torch"),
            )
            return list(table["calibration"]["checks"])

        table["calibration"]["checks"] = distributed.from_rank_zero(checked)

    # --- reporting, state, strip -----------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """NNCF's two tables: the prunable layers, and the model's MACs, params and filters."""
        rows = []
        full_filters = kept_filters = 0
        for name, (group, member) in self._layers().items():
            n = len(member.index)
            kept = int(self.keep[group.name][member.channel].sum())
            full_filters, kept_filters = full_filters + n, kept_filters + kept
            rows.append(
                {
                    "layer": name,
                    "group": group.name,
                    "weight shape": list(self._weight(name).shape),
                    "mask shape": [n],
                    "kept filters": kept,
                    "pruning level": 1.0 - kept / n,
                }
            )
        rows += moe.rows(self.experts, self.model)
        macs, params = self.macs_params(self.keep)
        # as NNCF: filters of every conv and linear layer, the pruned ones removed
        filters = self.full_filters - (full_filters - kept_filters)
        summary = [
            _row("MACs", self.full_macs, macs),
            _row("params", self.full_params, params),
            _row("filters", self.full_filters, filters),
        ]
        out = {"algorithm": self.name, "level": self.current, "frozen": self.frozen}
        if self.flops_target or self.latency_target:
            out["filter ratio"] = self.ratio
        out["prunable MACs share"] = self.macs_share
        out["prunable params share"] = self.params_share
        out["rounded whole"] = list(self.rounded_whole)
        if self.latency_table is not None:
            chosen = {n: int(k.sum()) for n, k in self.keep.items()}
            out["latency removed (predicted)"] = latency_calibration.removed_fraction(
                self.latency_table, chosen
            )
        return {
            **out,
            "layers": rows,
            "summary": summary,
            "excluded": exclusion_rows(self.excluded),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "level": self.current,
            "ratio": self.ratio,
            "frozen": self.frozen,
            "keep": {name: k.clone() for name, k in self.keep.items()},
            "calibration": None
            if self.calibration is None
            else {n: s.clone() for n, s in self.calibration.items()},
            "scop": None if self.scop is None else self.scop.state_dict(),
            "latency_table": copy.deepcopy(self.latency_table),
            "experts": moe.state_dict(self.experts),
        }

    def check_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get("keep")
        sizes = {g.name: g.size for g in self.groups}
        if (
            not isinstance(saved, Mapping)
            or sorted(saved) != sorted(sizes)
            or any(tuple(saved[n].shape) != (s,) for n, s in sizes.items())
        ):
            raise CompressError(
                f"{self.name} state does not fit this model: the state has groups "
                f"{sorted(saved or {})[:5]}, the model {sorted(sizes)[:5]} (or their widths differ)"
            )
        check_fraction(f"{self.name}.ratio", state.get("ratio", state.get("level")))
        check_flag(f"{self.name}.frozen", state.get("frozen"))
        scores = state.get("calibration")
        if scores is not None:  # nuclear_norm scores
            shapes = {n: [s] for n, s in sizes.items()}
            check_tensor_table(f"{self.name}.calibration", scores, shapes)
        if self.scop is not None and state.get("scop") is not None:
            self.scop.check_state(state["scop"], f"{self.name}.scop")
        moe.check(self.experts, state.get("experts"))
        # latency_table: checked by the controller against deploy's side-car schema

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state["keep"]
        self.current = float(state["level"])
        self.ratio = float(state.get("ratio", self.current))
        self.frozen = bool(state["frozen"])
        self.keep = {n: torch.as_tensor(k, dtype=torch.bool).clone() for n, k in saved.items()}
        if state.get("calibration") is not None:
            self.calibration = {n: s.clone() for n, s in state["calibration"].items()}
        if self.scop is not None and state.get("scop") is not None:
            self.scop.load_state_dict(state["scop"])
        if state.get("latency_table") is not None:
            self.latency_table = copy.deepcopy(dict(state["latency_table"]))
        moe.load(self.experts, state.get("experts"))
        self._apply()

    def strip_differs(self) -> str | None:
        pruned = {n for n, k in self.keep.items() if not k.all()}
        if any(not g.mask_norms for g in self.groups if g.name in pruned):
            return "prune_batch_norms is false: the norms of pruned channels stay unmasked"
        return None

    def strip(self, model: nn.Module) -> nn.Module:
        """The shrunk model (every mask folded first, then channels removed), carrying the plan
        of kept channels as ``compress_pruning_plan`` for the ``pruned`` export."""
        if self.scop is not None:
            self.scop.release(model)
        device = next(model.parameters()).device
        inputs = on_device(self.example_inputs or (), device)
        pruned = {n: k for n, k in self.keep.items() if not k.all()}
        if not self.groups and not self.experts.names:  # said at build too, and again here
            why = "; ".join(e.detail for e in self.excluded if e.kind == "trace failure")
            warnings.warn(
                "strip(): filter pruning removed nothing, the model keeps all its params: "
                + (why or "no group of coupled channels can be pruned"),
                stacklevel=3,
            )
        before = widths(model)
        dense = None
        if self.latency_table is not None:  # at full width, to time beside the stripped model
            dense = copy_model(model)
            for module in dense.modules():
                masks.remove(module)
        small = shrink(model, self.groups, pruned, example_inputs=inputs)
        moe.shrink(small, self.experts)  # and writes the experts' width into the config
        # a Hugging Face model's config states its widths
        update_config(small, before, pruned=bool(pruned) or moe.pruned(self.experts))
        plan = pruning_plan(self.groups, self.keep)
        setattr(small, "compress_pruning_plan", plan)  # noqa: B010  (mypy: nn.Module attrs are tensors)
        if self.latency_table is not None and dense is not None:
            chosen = {n: int(k.sum()) for n, k in self.keep.items()}
            # what the table predicted for the stripped model beside what it measures
            measured = latency.compare_models(
                dense,
                small,
                inputs,
                batch_size=self.params.get("latency_batch_size"),
                backend=self.params.get("latency_backend", "torch"),
            )
            report = {
                "chosen": chosen,
                **latency_calibration.prediction(self.latency_table, chosen),
                "target_speedup": 1.0 / (1.0 - float(self.latency_target or 0.0)),
                **measured,
            }
            setattr(small, "compress_latency_table", {**self.latency_table, **report})  # noqa: B010
        return small


def _row(what: str, full: int, current: int) -> dict[str, Any]:
    return {
        "": what,
        "full": full,
        "current": current,
        "pruned": 1.0 - current / full if full else 0.0,
    }
