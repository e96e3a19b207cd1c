"""Bootstrap of `lsg-patch run`: this folder is put first on PYTHONPATH, so every Python process started by the
command imports this file at start-up (site.py does), before the script's first line.

It first runs the sitecustomize it shadows (a virtualenv's or the distribution's, if any), then, when the
LSG_PATCH_RUN variable is set, turns on `lsg_patch.enabled()` for the whole process with its options.
A Python that cannot import lsg_patch says so on stderr and runs without LSG (nothing silent).
"""
import importlib.machinery
import importlib.util
import os
import sys


def _run_shadowed_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def _activate() -> None:
    options = os.environ.get("LSG_PATCH_RUN")
    if options is None:
        return
    try:
        import lsg_patch.run
    except ImportError:
        home = os.environ.get("LSG_PATCH_HOME")
        if home and home not in sys.path:
            sys.path.append(home)  # lsg_patch was importable by `lsg-patch run` from there
        try:
            import lsg_patch.run
        except ImportError as error:
            sys.stderr.write(f"lsg-patch run: {sys.executable} cannot import lsg_patch ({error}); "
                             "this process runs WITHOUT LSG\n")
            return
    lsg_patch.run.activate(options)


_run_shadowed_sitecustomize()
_activate()
