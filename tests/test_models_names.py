"""The torch-free list of built-in architectures matches the registry."""

from oscqat.config import BUILTIN_ARCHS, check_arch


def test_builtin_archs_are_exactly_the_registry_builtins():
    from oscqat.models import list_models

    assert set(BUILTIN_ARCHS) == set(list_models())


def test_check_arch_still_rejects_unknown_names():
    import pytest

    with pytest.raises(ValueError, match="unknown arch"):
        check_arch("not_a_net")
