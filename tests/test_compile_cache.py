"""compile_cache: the command line's persistent compilation cache (its flag's directory, or off)."""
import jax
import pytest

from mimo_jax import compile_cache


@pytest.fixture
def restore_config():
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    saved = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


def test_enable_sets_the_directory_and_caches_every_program(tmp_path, restore_config):
    where = tmp_path / "a" / "b"
    assert compile_cache.enable(str(where)) == str(where) and where.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(where)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0
    assert compile_cache.enable("") is None and compile_cache.enable(None) is None


def test_a_directory_that_cannot_be_made_turns_it_off_with_one_warning(tmp_path, capsys, restore_config):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert compile_cache.enable_or_warn(str(blocker / "cache")) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: compilation cache off") and "cache" in err[0]
    assert jax.config.jax_compilation_cache_dir is None
