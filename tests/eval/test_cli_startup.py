"""The command line answers at once: ``--help``, ``list`` and every ``COMMAND --help`` import
neither torch nor transformers (several seconds), and every command is in ``--help``.

``list`` reads the library's strategies from a generated catalog
(:mod:`contrastive_decoding.eval.listing`) unless something registers others; these tests check
that the catalog matches the live registry, that both give the same listing as the registry read
the way ``list`` always read it, and that strategies added through ``--import``, the environment
variable or another package's entry point are listed. Each command runs in a fresh interpreter,
so that what it imports is what the command imports; no timing is asserted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from contrastive_decoding.eval import listing
from contrastive_decoding.eval.cli import _COMMANDS, build_parser

# Runs the command line as the console script does, then records its status and whether it
# imported torch or transformers (argparse's --help exits through SystemExit, in `serve` too).
_PROBE = textwrap.dedent(
    """
    import json, sys
    from contrastive_decoding.eval.cli import main
    try:
        code = main(sys.argv[2:])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    heavy = sorted(name for name in ("torch", "transformers") if name in sys.modules)
    with open(sys.argv[1], "w") as f:
        json.dump({"code": code, "heavy": heavy}, f)
    """
)

# The commands main() hands on before argparse (their own parsers read the rest).
FORWARDED = ("serve", "lm-eval")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CONTRASTIVE_DECODING_STRATEGIES"}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def _run(tmp_path: Path, argv: list[str], env: dict[str, str] | None = None) -> tuple[dict, str, str]:
    """(status and heavy modules, stdout, stderr) of ``contrastive-decoding ARGV`` in a new process."""
    result = tmp_path / "probe.json"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(result), *argv],
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=600,
    )
    assert result.is_file(), f"{argv} did not finish:\n{done.stderr[-3000:]}"
    return json.loads(result.read_text()), done.stdout, done.stderr


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return list(action.choices)


def _third_party_strategies() -> list[str]:
    from importlib.metadata import entry_points

    return [ep.value for ep in entry_points(group="contrastive_decoding.strategies")]


def test_every_command_is_in_help(tmp_path):
    probe, out, _ = _run(tmp_path, ["--help"])
    assert probe["code"] == 0
    listed = re.search(r"\{([a-z,-]+)\}", out)
    assert listed, out
    # Every command main() runs: the parsed ones and those handed on before parsing.
    assert sorted(listed.group(1).split(",")) == sorted([*_COMMANDS, *FORWARDED])
    for name in [*_COMMANDS, *FORWARDED]:
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", out, re.M), f"{name} has no help line:\n{out}"


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in _subcommands())], ids=" ".join)
def test_help_imports_no_torch(tmp_path, argv):
    probe, out, err = _run(tmp_path, argv)
    assert probe["code"] == 0, err
    assert probe["heavy"] == [], f"`contrastive-decoding {' '.join(argv)}` imported {probe['heavy']}"
    first = out.lstrip().splitlines()[0]
    prog = "contrastive-decoding" if len(argv) == 1 else f"contrastive-decoding {argv[0]}"
    if argv[0] == "lm-eval":  # our note first, then lm-eval's own help
        prog = "contrastive-decoding [--import MODULE] lm-eval"
        assert "lm-eval's own help" in out and "usage: lm-eval" in out, out
    assert first.startswith(f"usage: {prog}"), out[:500]


def _reference_listing() -> str:
    """``list`` as the command printed it before the catalog: read from the live registry."""
    from contrastive_decoding.eval.benchmarks import BENCHMARKS
    from contrastive_decoding.eval.strategies import PRESETS, STRATEGIES

    lines = ["benchmarks:"]
    for b in BENCHMARKS.values():
        proto = f" [scoring: {b.default_protocol}]" if b.task == "score" else ""
        lines += [f"  {b.name:<22} {b.description}{proto}", f"  {'':<22} data: {b.source.describe()}"]
    lines.append("strategies:")
    for s in STRATEGIES.values():
        params = ", ".join(f"{k}={v!r}" for k, v in s.defaults.items()) or "no parameters"
        lines += [f"  {s.name:<22} {s.description}", f"  {'':<22} params: {params}"]
    lines.append("presets:")
    for name, (base, params) in PRESETS.items():
        lines.append(f"  {name:<22} = {base} " + " ".join(f"--param {k}={v}" for k, v in params.items()))
    return "\n".join(lines) + "\n"


def test_catalog_is_current(registry):
    # `registry` restores the registry afterwards; here it holds the library's strategies only.
    written = listing._catalog_source(listing.live_catalog())
    assert listing.CATALOG_FILE.read_text(encoding="utf-8") == written, (
        f"{listing.CATALOG_FILE.name} differs from the strategy registry; run "
        f"`{listing.REFRESH_COMMAND}` to refresh it"
    )
    assert listing.stored_catalog() == listing.live_catalog()


def test_list_is_the_registry_listing_without_torch(tmp_path, registry):
    if _third_party_strategies():
        plugins = _third_party_strategies()
        pytest.skip(f"installed packages add strategies ({plugins}): `list` reads the registry there")
    probe, out, err = _run(tmp_path, ["list"])
    assert probe == {"code": 0, "heavy": []}, err
    assert out == _reference_listing()
    assert listing.listing_text(live=True) == out == listing.listing_text(live=False)


def test_write_catalog_round_trips(tmp_path, registry, monkeypatch):
    monkeypatch.delenv("CONTRASTIVE_DECODING_STRATEGIES", raising=False)
    if _third_party_strategies():
        pytest.skip("installed packages add strategies: the catalog cannot be written here")
    path = listing.write_catalog(tmp_path / "catalog.py")
    assert path.read_text(encoding="utf-8") == listing.CATALOG_FILE.read_text(encoding="utf-8")
    monkeypatch.setenv("CONTRASTIVE_DECODING_STRATEGIES", "some_module")
    with pytest.raises(RuntimeError, match="CONTRASTIVE_DECODING_STRATEGIES"):
        listing.write_catalog(tmp_path / "other.py")
    assert not (tmp_path / "other.py").exists()


_PLUGIN = textwrap.dedent(
    '''
    from contrastive_decoding import DoLa, register_strategy


    @register_strategy("layer-two-{tag}")
    class LayerTwo(DoLa):
        """DoLa with layer 2 fixed ({tag})."""

        def __init__(self, relative_top: float = 0.25):
            super().__init__(dola_layers=2, relative_top=relative_top)
    '''
)


def _plugin(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"plugin_{tag}.py"
    path.write_text(_PLUGIN.format(tag=tag))
    return path


def _listed(out: str, name: str, description: str) -> bool:
    lines = out.splitlines()
    at = [i for i, line in enumerate(lines) if line.split()[:1] == [name]]
    return (
        len(at) == 1
        and lines[at[0]].endswith(description)
        and lines[at[0] + 1].strip() == "params: relative_top=0.25"
    )


def test_list_shows_imported_strategies(tmp_path):
    plugin = _plugin(tmp_path / "mods", "import")
    probe, out, err = _run(tmp_path, ["--import", str(plugin), "list"])
    assert probe["code"] == 0, err
    assert _listed(out, "layer-two-import", "DoLa with layer 2 fixed (import).")
    assert "dola-high" in out and "tfqa-hf" in out


def test_list_shows_strategies_of_the_environment_variable(tmp_path):
    plugin = _plugin(tmp_path / "mods", "env")
    probe, out, err = _run(tmp_path, ["list"], _env(CONTRASTIVE_DECODING_STRATEGIES=str(plugin)))
    assert probe["code"] == 0, err
    assert _listed(out, "layer-two-env", "DoLa with layer 2 fixed (env).")


def test_list_shows_strategies_of_installed_packages(tmp_path):
    """A package declaring a ``contrastive_decoding.strategies`` entry point (a dist-info on the
    path, as pip leaves it) adds its strategies to ``list``."""
    site = tmp_path / "site"
    _plugin(site, "pkg")
    dist = site / "cd_plugin_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cd-plugin-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[contrastive_decoding.strategies]\nmine = plugin_pkg\n")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    probe, out, err = _run(tmp_path, ["list"], _env(PYTHONPATH=path))
    assert probe["code"] == 0, err
    assert _listed(out, "layer-two-pkg", "DoLa with layer 2 fixed (pkg).")


def test_lm_eval_help_without_the_extra_says_how_to_install(monkeypatch, capsys):
    from contrastive_decoding.eval.cli import main

    monkeypatch.setattr("contrastive_decoding.integrations.lm_eval_available", lambda: False)
    assert main(["lm-eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: contrastive-decoding [--import MODULE] lm-eval")
    assert 'pip install "contrastive-decoding[lm-eval]"' in out and "lm-eval's own help" not in out


def test_harness_exports_are_lazy_and_complete():
    """``contrastive_decoding.eval`` imports nothing heavy itself, yet every public name resolves
    to its module's object; the lazy table, ``__all__`` and the static imports (read by type
    checkers and the docs) name the same things."""
    import ast
    import importlib

    import contrastive_decoding.eval as harness

    init = Path(harness.__file__)
    static: dict[str, str] = {}
    for node in ast.walk(ast.parse(init.read_text(encoding="utf-8"))):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                static.update({alias.name: stmt.module for alias in stmt.names})
    assert static == harness._EXPORTS
    assert sorted(harness.__all__) == sorted(static)
    for name, module in static.items():
        assert getattr(harness, name) is getattr(importlib.import_module(module), name), name
    probe = (
        "import sys, contrastive_decoding.eval\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=600
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_missing_catalog_falls_back_to_the_registry(monkeypatch, registry):
    # A None entry in sys.modules makes the import fail, as a wheel without the file would.
    monkeypatch.setitem(sys.modules, "contrastive_decoding.eval._strategy_catalog", None)
    with pytest.raises(RuntimeError, match=re.escape(listing.REFRESH_COMMAND)):
        listing.stored_catalog()
    assert listing.listing_text(live=False) == _reference_listing()
