"""unifattn: linear and sparse attention from short rules."""
