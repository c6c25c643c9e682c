"""Loading original checkpoints: both serializations, the allow-list, strict state dicts, the vocabulary."""

from __future__ import annotations

import fractions
import json
import os

import pytest
import torch

from export.checkpoint import CheckpointError, find_vocab, load_checkpoint, load_vocab
from export.to_onnx import main as to_onnx_main
from tests.helpers import small_config, write_checkpoint


def test_zip_and_legacy_checkpoints_load_identically(tmp_path):
    zip_ck = load_checkpoint(write_checkpoint(tmp_path / "zip", seed=3))
    legacy_path = write_checkpoint(tmp_path / "legacy", seed=3, legacy=True)
    with open(legacy_path, "rb") as f:
        assert f.read(2) != b"PK"  # really the non-zip format
    legacy = load_checkpoint(legacy_path)
    assert legacy.config == zip_ck.config == small_config()
    for a, b in zip(zip_ck.model.state_dict().values(), legacy.model.state_dict().values()):
        assert torch.equal(a, b)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def test_pickled_code_is_refused_and_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_checkpoint(tmp_path / "ck")
    ckpt = torch.load(path, weights_only=False)
    ckpt["opt"].payload = _Evil()
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "system" in str(e.value) and "--trust-checkpoint" in str(e.value)
    assert not (tmp_path / "pwned_by_checkpoint").exists()


def test_refusal_names_an_arbitrary_global(tmp_path):
    path = tmp_path / "odd.pth.tar"
    ckpt = torch.load(write_checkpoint(tmp_path / "ck"), weights_only=False)
    ckpt["extra"] = fractions.Fraction(1, 3)  # harmless, but not something the allow-list knows
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"fractions\.Fraction"):
        load_checkpoint(path)


def test_unknown_option_value_is_refused_by_name(tmp_path):
    path = write_checkpoint(tmp_path, agg_func="Median")
    with pytest.raises(CheckpointError, match="agg_func='Median'"):
        load_checkpoint(path)


def test_state_dict_mismatches_are_named(tmp_path):
    path = write_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=False)
    img, txt = ckpt["model"]
    img["fc.extra"] = torch.zeros(1)
    del txt["rnn.bias_hh_l0"]
    txt["embed.weight"] = torch.zeros(17, 99)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['fc\.extra'\]"):
        load_checkpoint(path)
    img.pop("fc.extra")
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "rnn.bias_hh_l0" in str(e.value) and "embed.weight" in str(e.value) and "(17, 99)" in str(e.value)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "x.pth")
    torch.save({"state_dict": {}}, tmp_path / "y.pth")
    with pytest.raises(CheckpointError, match="original layout"):
        load_checkpoint(tmp_path / "y.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pth")


def test_vocab_found_like_the_original_and_checked(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path / "run")
    ckpt = load_checkpoint(path)
    assert find_vocab(path, ckpt.opt) == tmp_path / "run" / "vocab" / "tiny_precomp_vocab.json"
    # relative to the working directory, as the original evaluation resolves ./vocab/
    bare = write_checkpoint(tmp_path / "bare", with_vocab=False)
    (tmp_path / "cwd" / "vocab").mkdir(parents=True)
    (tmp_path / "cwd" / "vocab" / "tiny_precomp_vocab.json").write_text(
        (tmp_path / "run" / "vocab" / "tiny_precomp_vocab.json").read_text()
    )
    monkeypatch.chdir(tmp_path / "cwd")
    assert find_vocab(bare, ckpt.opt).resolve() == (tmp_path / "cwd" / "vocab" / "tiny_precomp_vocab.json").resolve()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="--vocab"):
        find_vocab(bare, ckpt.opt)
    # the original repository layout: runs/<run>/model_best.pth.tar and ./vocab/ at the top
    nested = write_checkpoint(tmp_path / "repo" / "runs" / "run1", with_vocab=False)
    (tmp_path / "repo" / "vocab").mkdir()
    (tmp_path / "repo" / "vocab" / "tiny_precomp_vocab.json").write_text(
        (tmp_path / "run" / "vocab" / "tiny_precomp_vocab.json").read_text()
    )
    assert find_vocab(nested, ckpt.opt) == (tmp_path / "repo" / "vocab" / "tiny_precomp_vocab.json").resolve()


def test_vocab_size_mismatch_is_refused(tmp_path):
    path = write_checkpoint(tmp_path)
    vocab = tmp_path / "vocab" / "tiny_precomp_vocab.json"
    data = json.loads(vocab.read_text())
    data["idx2word"]["17"] = "extra"
    data["word2idx"]["extra"] = 17
    data["idx"] = 18
    vocab.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"18 words .* 17 rows"):
        load_vocab(vocab, load_checkpoint(path).config)


def test_weight_norm_encoder_keys(tmp_path):
    ck = load_checkpoint(write_checkpoint(tmp_path, small_config(precomp_enc_type="weight_norm")))
    assert set(ck.model.img_enc.state_dict()) == {"fc.weight_g", "fc.weight_v", "fc.bias"}


def _deflation_bomb(src, dst, unpacked: int):
    """``src`` with its first storage record replaced by ``unpacked`` zero bytes, deflated (small on disk)."""
    import re
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if re.search(r"/data/0$", info.filename):
                record = zipfile.ZipInfo(info.filename)
                record.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(record, "w", force_zip64=True) as f:
                    for _ in range(unpacked >> 20):
                        f.write(bytes(1 << 20))
            else:
                zout.writestr(info, zin.read(info))
    return dst


def test_deflation_bomb_is_refused_before_loading(tmp_path, monkeypatch):
    bomb = _deflation_bomb(write_checkpoint(tmp_path / "run"), tmp_path / "bomb.pth.tar", 256 << 20)
    assert bomb.stat().st_size < 2 << 20  # 256 MiB unpacked, under 1 MiB on disk
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))  # nothing may reach the unpickler
    with pytest.raises(
        CheckpointError,
        match=r"declares 268,[0-9,]+ bytes unpacked in a file of [0-9,]+ bytes "
        r"\(.*data/0: 268,435,456 bytes compressed to [0-9,]+\).*bomb",
    ):
        load_checkpoint(bomb)
    assert not loads
    assert to_onnx_main([str(bomb), "--out", str(tmp_path / "out")]) == 1


def test_checkpoint_size_limit_and_its_opt_out(tmp_path, capsys):
    zip_path = write_checkpoint(tmp_path / "zip")
    legacy_path = write_checkpoint(tmp_path / "legacy", legacy=True)
    for path in (zip_path, legacy_path):
        with pytest.raises(CheckpointError, match=r"[0-9,]+ bytes to load, more than the limit of 1,000 bytes"):
            load_checkpoint(path, max_bytes=1000)
        assert load_checkpoint(path, max_bytes=None).config == small_config()
    assert to_onnx_main([str(zip_path), "--out", str(tmp_path / "out"), "--max-checkpoint-gb", "0.000001"]) == 1
    assert "--max-checkpoint-gb" in capsys.readouterr().err
