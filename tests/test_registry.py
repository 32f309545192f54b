import pytest

from dd_bench.errors import ConfigError, UnknownNameError
from dd_bench.method import METHODS
from dd_bench.registry import Registry


def test_register_lookup_aliases_case_insensitive():
    registry: Registry[object] = Registry("widget")

    @registry.register("FancyNet", "fancy")
    class Fancy:
        """A fancy widget."""

    assert registry.get("fancynet") is Fancy
    assert registry.get("FANCY") is Fancy
    assert registry.get("fancy-net".replace("-", "")) is Fancy
    assert registry.canonical("fancy") == "FancyNet"
    assert registry.names() == ["FancyNet"]
    assert registry.aliases_of("FancyNet") == ["fancy"]
    assert "fancy" in registry and "other" not in registry


def test_unknown_name_lists_available():
    registry: Registry[object] = Registry("method")
    registry.add("alpha", lambda: 1)
    registry.add("beta", lambda: 2)
    with pytest.raises(UnknownNameError) as info:
        registry.get("gamma")
    assert str(info.value) == "Unknown method 'gamma'. Available: alpha, beta"


def test_conflicting_registration_is_an_error():
    registry: Registry[object] = Registry("thing")
    registry.add("a", int)
    with pytest.raises(ConfigError):
        registry.add("a", float)


def test_registration_checks_the_base_class_or_callability():
    class Base:
        pass

    class Child(Base):
        pass

    typed: Registry[type] = Registry("method", base=Base)
    typed.add("child", Child)
    with pytest.raises(ConfigError, match="method 'stranger'.*not a subclass of Base"):
        typed.add("stranger", int)
    with pytest.raises(ConfigError, match="not a subclass"):
        typed.add("instance", Child())
    untyped: Registry[object] = Registry("model")
    with pytest.raises(ConfigError, match="model 'seven'.*not callable"):
        untyped.add("seven", 7)


def test_glob_listing():
    registry: Registry[object] = Registry("model")
    for name in ("ConvNet", "ConvNetBN", "ResNet18"):
        registry.add(name, dict)
    assert registry.names("convnet*") == ["ConvNet", "ConvNetBN"]


def test_builtin_methods_are_discovered_from_the_methods_package():
    for name in ("random", "herding", "kcenter", "full"):
        assert name in METHODS


def test_entry_point_plugins_are_loaded(monkeypatch):
    """A third-party package's entry point is imported on first lookup and can register."""
    import sys
    import types

    module = types.ModuleType("fake_plugin")

    def load_plugin():
        registry.add("plugged", str)
        return module

    class FakeEntry:
        name = "plugged"

        def load(self):
            return load_plugin()

    registry: Registry[str] = Registry("method", entry_point_group="dd_bench.test_group")
    monkeypatch.setattr("dd_bench.registry.entry_points",
                        lambda group: [FakeEntry()] if group == "dd_bench.test_group" else [])
    monkeypatch.setitem(sys.modules, "fake_plugin", module)
    assert registry.get("plugged") is str
