"""The `scratchllm` command: help everywhere, one-line errors, nothing half-written."""

import json
import subprocess
import sys

import pytest

from scratchllm.cli import build_parser, main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "scratchllm", "--version"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.startswith("scratchllm ")


def test_the_parser_does_not_import_torch():
    # Every command starts by building the whole parser; torch's import alone takes seconds.
    code = "import sys, scratchllm.cli as c; c.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def all_command_paths(parser, prefix=()):
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for name, sub in action.choices.items():
            yield (*prefix, name)
            yield from all_command_paths(sub, (*prefix, name))


@pytest.mark.parametrize("path", list(all_command_paths(build_parser())))
def test_every_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    assert "usage: scratchllm" in capsys.readouterr().out


def test_train_encode_decode_stats_export(tmp_path, data, capsys):
    tok = tmp_path / "tok.json"
    verdict = str(data / "the-verdict" / "the-verdict.txt")
    code, out, _ = run(capsys, "tokenizer", "train", "--data", verdict, "--vocab-size", "400",
                       "--out", str(tok), "--special", "<|user|>")
    assert code == 0 and tok.is_file() and "400 ids" in out
    code, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", str(tok), "--json",
                       "--text", "I had always thought<|user|>", "--allow-special")
    ids = json.loads(out)
    assert code == 0 and ids[-1] == 399
    code, out, _ = run(capsys, "tokenizer", "decode", "--tokenizer", str(tok), *map(str, ids))
    assert out == "I had always thought<|user|>\n"
    code, out, _ = run(capsys, "tokenizer", "stats", "--tokenizer", str(tok), "--data", verdict,
                       "--json")
    stats = json.loads(out)
    assert stats["vocab_size"] == 400 and 1.5 < stats["bytes_per_token"] < 5
    code, out, _ = run(capsys, "tokenizer", "export-hf", "--tokenizer", str(tok),
                       "--out", str(tmp_path / "hf.json"))
    assert code == 0 and json.loads((tmp_path / "hf.json").read_text())["model"]["type"] == "BPE"


def test_char_tokenizer_from_cli(tmp_path, data, capsys):
    tok = tmp_path / "char.json"
    code, out, _ = run(capsys, "tokenizer", "train", "--char", "--out", str(tok),
                       "--data", str(data / "tinyshakespeare" / "input.txt"))
    assert code == 0 and "68 ids" in out  # 65 characters + 3 specials


def test_import_gpt2(tmp_path, gpt2_files, capsys):
    out_path = tmp_path / "gpt2.json"
    code, out, _ = run(capsys, "tokenizer", "import-gpt2", "--encoder-json", str(gpt2_files[0]),
                       "--vocab-bpe", str(gpt2_files[1]), "--out", str(out_path))
    assert code == 0 and "50257 ids" in out
    code, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", str(out_path),
                       "--text", "Hello world")
    assert out.split() == ["15496", "995"]


def one_line_error(capsys, *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 1, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out.json"
    train = ("tokenizer", "train", "--out", str(out), "--data")
    assert "does not exist" in one_line_error(capsys, *train, str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n\n ")
    assert "empty" in one_line_error(capsys, *train, str(tmp_path / "empty.txt"))
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    assert "binary" in one_line_error(capsys, *train, str(tmp_path / "blob.bin"))
    (tmp_path / "emptydir").mkdir()
    assert "no readable files" in one_line_error(capsys, *train, str(tmp_path / "emptydir"))
    (tmp_path / "ok.txt").write_text("hello world " * 10)
    assert "too small" in one_line_error(capsys, *train, str(tmp_path / "ok.txt"),
                                         "--vocab-size", "100")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    bad_tok = tmp_path / "bad.json"
    bad_tok.write_text('{"format": "scratchllm-tokenizer", "version": 7}')
    assert "version 7" in one_line_error(capsys, "tokenizer", "encode", "--tokenizer",
                                         str(bad_tok), "--text", "hi")
    assert "does not exist" in one_line_error(capsys, "tokenizer", "decode", "--tokenizer",
                                              str(tmp_path / "nope.json"), "1")


def test_out_of_range_decode_is_an_error(tmp_path, capsys, trained_tok):
    trained_tok.save(tmp_path / "tok.json")
    err = one_line_error(capsys, "tokenizer", "decode", "--tokenizer", str(tmp_path / "tok.json"),
                         "5", "4096")
    assert "out of range" in err


def test_non_utf8_file_is_trained_with_a_count_of_replaced_bytes(tmp_path, capsys):
    src = tmp_path / "latin1.txt"
    src.write_bytes("café crème brûlée\n".encode("latin-1") * 20)  # 22% of its bytes
    code, out, err = run(capsys, "tokenizer", "train", "--data", str(src), "--vocab-size", "300",
                         "--out", str(tmp_path / "tok.json"))
    assert code == 1 and "--allow-binary" in err and not (tmp_path / "tok.json").exists()
    code, out, err = run(capsys, "tokenizer", "train", "--data", str(src), "--vocab-size", "300",
                         "--out", str(tmp_path / "tok.json"), "--allow-binary")
    assert code == 0
    assert "80 bytes were not valid UTF-8" in err  # 4 Latin-1 bytes per line, 20 lines


def test_prepare_and_data_commands(tmp_path, data, capsys, monkeypatch, trained_tok):
    monkeypatch.setenv("SCRATCHLLM_DATA_DIR", str(data))
    trained_tok.save(tmp_path / "tok.json")
    argv = ["prepare", "--data", "the-verdict", "--tokenizer", str(tmp_path / "tok.json"),
            "--out", str(tmp_path / "shards"), "--val-docs", "0"]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "prepared" in out and (tmp_path / "shards" / "train.bin").is_file()
    assert "up to date" in run(capsys, *argv)[1]
    code, out, _ = run(capsys, "data", "list")
    assert "tinyshakespeare" in out and "CC BY 4.0" in out
    code, out, _ = run(capsys, "data", "download", "the-verdict")
    assert out.strip().endswith("the-verdict.txt")
    assert "unknown dataset" in one_line_error(capsys, "data", "download", "nope")
