"""Recipes: loading and validating NNCF-format JSON against the shipped schema, and scopes."""
