"""Typed run configuration: dataclasses per component, YAML with `extends:`, dotted overrides, one error report."""

from .core import ConfigError, Problems, doc
