"""Torch-free shared types: what every layer may import (no torch, no model code)."""
