"""One error root: every project exception is a ScopecastError (a user-facing problem whose
message names the bad value), and keeps its stdlib base so ``except ValueError`` still works."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from calibration.errors import InvalidInput, ScopecastError, user_mistakes

PACKAGES = ("calibration", "stream", "engines", "bench")

#: project exceptions that are not user mistakes, each with the reason
NOT_USER_ERRORS = {
    # the engine server process died: a failure, reported with exit code 3, not a mistake
    "stream.acquire.ServerFailed",
}

#: modules that cannot be imported just to look at them
SKIP_MODULES = {"stream.__main__", "bench.__main__"}


def _project_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for name in PACKAGES:
        package = importlib.import_module(name)
        modules = [name] + [
            m.name for m in pkgutil.walk_packages(package.__path__, prefix=f"{name}.")
        ]
        for module_name in modules:
            if module_name in SKIP_MODULES:
                continue
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:  # an optional extra (tensorrt, pycuda) not installed here
                if e.name and e.name.split(".")[0] in PACKAGES:
                    raise
                continue
            for obj in vars(module).values():
                if (
                    inspect.isclass(obj)
                    and issubclass(obj, BaseException)
                    and obj.__module__ == module_name
                ):
                    found[f"{module_name}.{obj.__qualname__}"] = obj
    return found


def test_every_project_exception_derives_from_the_root() -> None:
    found = _project_exceptions()
    assert len(found) >= 25, sorted(found)  # the walk found the packages' errors
    assert set(found) >= NOT_USER_ERRORS, "an exclusion names a class that no longer exists"
    outside = sorted(
        name for name, cls in found.items()
        if not issubclass(cls, ScopecastError) and name not in NOT_USER_ERRORS
    )  # fmt: skip
    assert not outside, f"derive these from calibration.errors.ScopecastError: {outside}"


def test_every_error_keeps_a_stdlib_base() -> None:
    """``class ProtocolError(ScopecastError, ValueError)``: code that catches ValueError,
    RuntimeError or OSError still catches it."""
    plain = (Exception, BaseException, object)
    for name, cls in _project_exceptions().items():
        if cls is ScopecastError:
            continue
        stdlib = [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in plain]
        assert stdlib, f"{name} has no stdlib base besides Exception"


def test_the_root_says_what_it_promises() -> None:
    doc = " ".join((ScopecastError.__doc__ or "").split())
    assert "user-facing" in doc and "names the bad value" in doc and "what to do" in doc


def test_user_mistakes_turns_plain_value_errors_into_the_root() -> None:
    with (
        pytest.raises(InvalidInput, match="seconds -1 must be > 0") as e,
        user_mistakes(ValueError),
    ):
        raise ValueError("seconds -1 must be > 0")
    assert isinstance(e.value, ValueError) and isinstance(e.value.__cause__, ValueError)
    with pytest.raises(KeyError), user_mistakes(ValueError):  # not the user's: untouched
        raise KeyError("x")
