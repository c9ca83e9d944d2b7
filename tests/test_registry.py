"""Where each variant came from, and registry errors: one line, exit 2, both sources named."""

from __future__ import annotations

import textwrap
from types import SimpleNamespace

import pytest

from klppo_bench.cli import main
from klppo_bench.errors import ConfigError
from klppo_bench.variants import describe_source, get_variant, variant_source
from klppo_bench.variants.registry import load_plugins

from tests.conftest import TINY

PLUGIN = """\
import dataclasses
from klppo_bench.variants import get_variant, register

register(dataclasses.replace(get_variant("clip"), name={first!r}, description="mine"))
register(dataclasses.replace(get_variant("clip"), name={second!r}, description="mine"))
"""


def write_plugin(path, first, second):
    path.write_text(PLUGIN.format(first=first, second=second))
    return path


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("klppo-bench: error: ")
    return lines[0]


@pytest.mark.parametrize("command", ["variants", "run"])
def test_plugin_reregistering_clip_is_one_line_exit_2_naming_both_sources(
        command, tmp_path, capsys, fresh_registry):
    builtin_clip = get_variant("clip")
    plugin = write_plugin(tmp_path / "x.py", "x-first", "clip")
    out = tmp_path / "exp"
    argv = [command, "--plugin", str(plugin)]
    if command == "run":
        argv += ["--variant", "clip", "--env", "Hopper", "--out", str(out)]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert (f"variant 'clip' is registered twice: by built-in (klppo_bench.variants.builtin) "
            f"and by plugin file {plugin}") in line
    assert line.startswith(f"klppo-bench: error: --plugin {plugin}: ")
    # nothing of the failed plugin stays: clip is the built-in, x-first is gone
    assert get_variant("clip") is builtin_clip
    assert variant_source("clip")["kind"] == "builtin"
    with pytest.raises(ConfigError, match="unknown variant 'x-first'"):
        get_variant("x-first")
    assert not out.exists()


def test_two_plugins_with_one_name_name_both_files(tmp_path, capsys, fresh_registry):
    a = write_plugin(tmp_path / "a.py", "mine-a", "mine")
    b = write_plugin(tmp_path / "b.py", "mine-b", "mine")
    assert main(["variants", "--plugin", str(a), "--plugin", str(b)]) == 2
    line = one_error_line(capsys)
    assert f"variant 'mine' is registered twice: by plugin file {a} and by plugin file {b}" in line


def test_a_plugin_that_raises_is_one_line_naming_file_and_line(tmp_path, capsys, fresh_registry):
    plugin = tmp_path / "typo.py"
    plugin.write_text("import klppo_bench\n\nregister(None)\n")
    assert main(["variants", "--plugin", str(plugin)]) == 2
    line = one_error_line(capsys)
    assert (f"--plugin {plugin}: cannot import it (NameError: name 'register' is not defined "
            f"at {plugin}:3)") in line


def test_variant_source_records_builtin_file_and_module(tmp_path, monkeypatch, fresh_registry):
    assert variant_source("clip") == {
        "kind": "builtin", "name": "klppo_bench.variants.builtin", "package": "klppo-bench",
        "version": __import__("klppo_bench").__version__, "path": None, "sha256": None}
    assert describe_source(variant_source("clip")) == "built-in (klppo_bench.variants.builtin)"

    plugin = write_plugin(tmp_path / "src_file.py", "src-file-a", "src-file-b")
    load_plugins([str(plugin)])
    source = variant_source("src-file-b")
    assert source["kind"] == "plugin file" and source["path"] == str(plugin)
    assert len(source["sha256"]) == 64
    assert describe_source(source) == f"plugin file {plugin}"

    monkeypatch.syspath_prepend(str(tmp_path))
    write_plugin(tmp_path / "src_module_plugin.py", "src-mod-a", "src-mod-b")
    load_plugins(["src_module_plugin"])
    source = variant_source("src-mod-a")
    assert source["kind"] == "plugin module" and source["name"] == "src_module_plugin"
    assert source["path"] == str(tmp_path / "src_module_plugin.py")
    assert describe_source(source) == "plugin module src_module_plugin"
    with pytest.raises(ConfigError, match="unknown variant 'nope'; allowed: "):
        variant_source("nope")


def fake_entry_point(name, load, dist=("demo-pkg", "1.2")):
    return SimpleNamespace(name=name, load=load,
                           dist=SimpleNamespace(name=dist[0], version=dist[1]))


def ep_variant(name, description="from an entry point"):
    import dataclasses

    return dataclasses.replace(get_variant("clip"), name=name, description=description)


def use_entry_points(monkeypatch, registry, *eps):
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(registry.metadata, "entry_points",
                        lambda group: list(eps) if group == registry.ENTRY_POINT_GROUP else [])


def test_broken_entry_point_warns_once_and_commands_go_on(tmp_path, capsys, monkeypatch,
                                                          fresh_registry):
    def broken():
        raise ModuleNotFoundError("No module named 'gone'")

    use_entry_points(monkeypatch, fresh_registry, fake_entry_point("bad", broken),
                     fake_entry_point("good", lambda: lambda: [ep_variant("ep-good")]))
    assert main(["variants"]) == 0
    captured = capsys.readouterr()
    assert "ep-good" in captured.out and "clip" in captured.out
    assert captured.err.strip().splitlines() == [
        "klppo-bench: warning: entry point bad (package demo-pkg 1.2) is broken and skipped: "
        "ModuleNotFoundError: No module named 'gone'"]
    assert variant_source("ep-good") == {
        "kind": "entry point", "name": "good", "package": "demo-pkg", "version": "1.2",
        "path": None, "sha256": None}

    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    assert main(["run", "--variant", "clip", "--env", "Hopper", "--frames", "256", "--quiet",
                 "--out", str(tmp_path / "exp"), *sets]) == 0
    assert "warning" not in capsys.readouterr().err  # once per process


def test_entry_point_reusing_a_name_warns_naming_both_and_the_first_stays(
        capsys, monkeypatch, fresh_registry):
    builtin_clip = get_variant("clip")
    use_entry_points(monkeypatch, fresh_registry,
                     fake_entry_point("clash", lambda: [ep_variant("clip"), ep_variant("ep-ok")]))
    variants = fresh_registry.all_variants()
    assert variants["clip"] is builtin_clip and "ep-ok" in variants
    assert capsys.readouterr().err.strip().splitlines() == [
        "klppo-bench: warning: variant 'clip' is registered twice: by built-in "
        "(klppo_bench.variants.builtin) and by entry point clash (package demo-pkg 1.2); "
        "the first is kept"]


def test_entry_point_of_the_wrong_type_is_skipped_with_a_warning(capsys, monkeypatch,
                                                                  fresh_registry):
    use_entry_points(monkeypatch, fresh_registry, fake_entry_point("junk", lambda: 42))
    assert "clip" in fresh_registry.all_variants()
    err = capsys.readouterr().err
    assert ("entry point junk (package demo-pkg 1.2) is broken and skipped: TypeError: it "
            "gave type int; allowed: a Variant") in err


def test_spec_plugin_clash_names_spec_key_and_both_sources(tmp_path, capsys, fresh_registry):
    write_plugin(tmp_path / "dup.py", "dup-first", "klpen-fixed")
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent("""\
        envs: [Hopper]
        seeds: 1
        frames: 4096
        variants: [clip]
        plugins: [dup.py]
        """))
    assert main(["sweep", str(spec), "--dry-run", "--results", str(tmp_path / "r")]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"klppo-bench: error: {spec}: plugins: dup.py: variant 'klpen-fixed' "
                           "is registered twice: by built-in (klppo_bench.variants.builtin) and "
                           f"by plugin file {tmp_path / 'dup.py'}")


def test_plugin_errors_point_at_the_plugins_own_line(tmp_path, capsys, fresh_registry):
    plugin = tmp_path / "bad_variant.py"
    plugin.write_text("import dataclasses\nfrom klppo_bench.variants import get_variant\n\n"
                      "dataclasses.replace(get_variant('clip'), kl_estimator='exact')\n")
    assert main(["variants", "--plugin", str(plugin)]) == 2
    line = one_error_line(capsys)
    assert "ValueError: variant clip: kl_estimator='exact'" in line and f"{plugin}:4)" in line
    assert main(["variants", "--plugin", "no_such_plugin_module"]) == 2
    assert one_error_line(capsys).endswith(
        "--plugin no_such_plugin_module: cannot import it (ModuleNotFoundError: No module named "
        "'no_such_plugin_module'); allowed: a .py file or an importable module that calls "
        "register()")


def test_the_registry_and_the_builtins_do_not_import_each_other():
    import ast
    from pathlib import Path

    import klppo_bench.variants as pkg

    def imported(name: str) -> set[str]:
        tree = ast.parse((Path(pkg.__file__).parent / f"{name}.py").read_text())
        mods = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mods.add(node.module or "")
                mods.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                mods.update(a.name for a in node.names)
        return mods

    assert "klppo_bench.variants.registry" not in imported("builtin")
    assert "klppo_bench.variants.builtin" in imported("registry")  # one direction only
    for module in ("variant", "common", "params", "outputs", "torchrl_parts"):
        assert not {m for m in imported(module) if m.startswith("klppo_bench.variants.registry")}
