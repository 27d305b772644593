"""A user's own model as `path/to/file.py:factory` or `package.module:factory`: what records it (the file and its
sha256, so a later job refuses a changed file) and what rebuilds it (the factory called, its output checked).
Rebuilding imports and runs the user's file: the one place advtune runs code named by a record, only after the
file's hash matches the record's."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .attacks import logits_of
from .errors import AdvtuneError


def split_spec(spec: str) -> tuple[str, str]:
    where, _, name = spec.strip().rpartition(":")
    if not where or not name.isidentifier():
        raise AdvtuneError(
            f"--model {spec!r}: write path/to/file.py:factory or package.module:factory "
            "(factory = a function returning an nn.Module)"
        )
    return where, name


def factory_record(spec: str) -> dict[str, Any]:
    """What rebuilds the model later: the spec with the file's absolute path, and the file's sha256
    (a run refuses a changed file). Validates that the file and the name exist."""
    where, name = split_spec(spec)
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise AdvtuneError(f"--model {spec!r}: no such file {path}; check the path")
        return {"spec": f"{path}:{name}", "file": str(path), "name": name, "sha256": _sha256(path)}
    record: dict[str, Any] = {"spec": f"{where}:{name}", "module": where, "name": name}
    _importable_from_cwd()
    found = _locate_module(where)
    if found is None:
        raise AdvtuneError(
            f"--model {spec!r}: no module {where!r} on the Python path; run from the folder that holds "
            "it, or give path/to/file.py:factory"
        )
    if not (found.origin and Path(found.origin).is_file()):  # a built-in, frozen or zipped module: no file to hash
        raise AdvtuneError(f"--model {spec!r}: module {where!r} has no .py file to record; give file.py:factory")
    record.update(module_file=found.origin, sha256=_sha256(Path(found.origin)))
    return record


def _locate_module(dotted: str):
    """The import spec of module `dotted` found as `import` would find it, without running any code:
    `importlib.util.find_spec("pkg.mod")` imports `pkg` (runs its __init__.py) to look inside, and the file's hash is
    checked only after this. Each part is asked of the import system's finders (sys.meta_path: the path, editable
    installs' hooks) with its parent's search locations; already-imported packages are looked in where they are.
    None when not found."""
    loaded = sys.modules.get(dotted)
    if loaded is not None and getattr(loaded, "__spec__", None) is not None:  # imported already (os.path too)
        return loaded.__spec__
    search, found = None, None
    parts = dotted.split(".")
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        loaded = sys.modules.get(name)
        if loaded is not None and getattr(loaded, "__spec__", None) is not None:
            found = loaded.__spec__
        elif i == 0:
            try:  # a top-level name: find_spec imports nothing to find it
                found = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                return None
        else:
            found = _find_in(name, search)
        if found is None:
            return None
        search = found.submodule_search_locations
        if i < len(parts) - 1 and search is None:  # "mod.sub" where mod is not a package
            return None
    return found


def _find_in(name: str, search):
    """`name`'s spec from the first of sys.meta_path's finders that knows it, inside its parent's `search` path."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            found = find(name, search)
        except (ImportError, ValueError, TypeError):
            continue
        if found is not None:
            return found
    return None


def _importable_from_cwd() -> None:
    """Like `python -m`: a package in the working folder is importable."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


USER_FILES: set[str] = set()  # the model files this process ran: a job's error names the line of yours in them


def user_code_line(exc: BaseException) -> str | None:
    """`file.py:line` of the last frame in `exc`'s traceback that ran in your model's file; None when none did."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename in USER_FILES]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else None


def _load_factory(record: dict[str, Any]) -> Callable[..., Any]:
    name = record["name"]
    if "file" in record:
        path = Path(record["file"])
        mod_name = f"advtune_user_model_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise AdvtuneError(f"--model: cannot load {path} as Python; it must be a .py file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling in the user's file look modules up here
        where = str(path)
        USER_FILES.add(str(path))
    else:
        where = record["module"]
        module = None
        USER_FILES.add(str(record.get("module_file", "")))
    try:
        if module is not None:
            if str(path.parent) not in sys.path:  # its helper modules beside it import (installed ones win a name)
                sys.path.append(str(path.parent))
            spec.loader.exec_module(module)
        else:
            _importable_from_cwd()
            module = importlib.import_module(where)
    except Exception as e:  # the user's code: any error becomes one line naming the file
        raise AdvtuneError(
            f"--model: importing {where} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        ) from None
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        have = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))[:8]
        raise AdvtuneError(
            f"--model: {where} has no function {name!r}" + (f"; it has: {', '.join(have)}" if have else "")
        )
    return factory


def build_from_factory(
    spec: str | dict[str, Any], input_shape, num_classes: int, expect_sha256: str | None = None
) -> nn.Module:
    """Call the user's factory and check what it returns: an nn.Module that maps a batch of
    `input_shape` pixels to (N, num_classes) logits. The factory gets `input_shape` and/or
    `num_classes` as keywords when its signature names them, nothing otherwise."""
    record = factory_record(spec) if isinstance(spec, str) else spec
    if expect_sha256 is not None and record.get("sha256") not in (None, expect_sha256):
        raise AdvtuneError(
            f"the model file {record.get('file') or record.get('module_file')} changed since this run was written "
            "(sha256 "
            f"{record['sha256'][:12]}... vs {expect_sha256[:12]}... recorded); restore it, or train a new run"
        )
    factory = _load_factory(record)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    offer = {"input_shape": tuple(int(v) for v in input_shape), "num_classes": int(num_classes)}
    kwargs = {k: v for k, v in offer.items() if k in params}
    try:
        model = factory(**kwargs)
    except Exception as e:
        raise AdvtuneError(
            f"--model {record['spec']}: the factory raised {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        ) from None
    if not isinstance(model, nn.Module):
        raise AdvtuneError(
            f"--model {record['spec']}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )

    was = model.training
    model.eval()
    with torch.no_grad():
        out = logits_of(model, torch.zeros(2, *offer["input_shape"]))
    model.train(was)
    if out.shape[1] != num_classes:
        raise AdvtuneError(
            f"--model {record['spec']}: the model returns {out.shape[1]} outputs per example but the "
            f"data has {num_classes} classes; make its last layer output {num_classes}"
        )
    model.advtune_factory = record  # type: ignore[attr-defined]  # save_model records it
    model.advtune_build = {"input_shape": list(offer["input_shape"]), "num_classes": int(num_classes)}  # type: ignore[attr-defined]
    return model
