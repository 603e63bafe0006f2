"""Transforms applied to loaded models from outside, in the order the execution plan fixes."""
