"""Command-line entry points (``spattn generate | plan | doctor``): the top layer, importing only the
public API and the integrations below it."""
