"""inference/builtin"""
