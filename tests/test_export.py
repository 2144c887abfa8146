"""save_merged / load_merged: exact round trips, atomic saves, refused bad files."""

import copy
import hashlib
import importlib.metadata
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from sklearn.exceptions import NotFittedError
from skorch import NeuralNetClassifier

import sk_softmerge
from sk_softmerge import SoftMergeClassifier, load_merged
from sk_softmerge._export import FORMAT, FORMAT_VERSION

from conftest import forked_members, make_module

# Layer gates: the malformed-gates cases below count on two unit names.
FAST = dict(max_epochs=2, random_state=0, granularity="layer")
MODULE_KWARGS = dict(n_features=64, n_classes=10)


@pytest.fixture(scope="module")
def fitted(members, digits):
    return SoftMergeClassifier(members, **FAST).fit(*digits)


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    """The files of ``fitted``, written once; tests work on copies."""
    weights, _ = fitted.save_merged(tmp_path_factory.mktemp("saved") / "m.safetensors")
    return weights


@pytest.fixture
def path(saved, tmp_path):
    """A private copy of the saved files, free to damage."""
    for source in (saved, saved.with_suffix(".json")):
        shutil.copy(source, tmp_path / source.name)
    return tmp_path / saved.name


def read_sidecar(path):
    return json.loads(path.with_suffix(".json").read_text())


def write_sidecar(path, sidecar):
    path.with_suffix(".json").write_text(json.dumps(sidecar))


def rewrite_weights(path, tensors):
    """Replace the weights and update the sidecar to match: a consistent pair."""
    data = safetensors.torch.save(tensors)
    path.write_bytes(data)
    sidecar = read_sidecar(path)
    sidecar["weights"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    sidecar["tensors"] = {
        name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        for name, t in tensors.items()
    }
    write_sidecar(path, sidecar)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_refused(
    path, match, error=ValueError, module=make_module, module_kwargs=MODULE_KWARGS
):
    """load_merged raises ``error`` and neither writes files nor draws numbers."""
    before = snapshot(path.parent)
    rng_state = torch.random.get_rng_state()
    with pytest.raises(error, match=match):
        load_merged(path, module, **module_kwargs)
    assert snapshot(path.parent) == before
    assert torch.equal(torch.random.get_rng_state(), rng_state)


class TestRoundTrip:
    def test_predictions_identical(self, fitted, saved, digits):
        X, _ = digits
        net = load_merged(saved, make_module, **MODULE_KWARGS)
        assert type(net) is NeuralNetClassifier
        np.testing.assert_array_equal(net.predict_proba(X), fitted.predict_proba(X))
        np.testing.assert_array_equal(
            fitted.classes_[net.predict(X)], fitted.predict(X)
        )
        np.testing.assert_array_equal(net.classes_, fitted.classes_)

    def test_weights_and_net_settings_identical(self, fitted, saved):
        net = load_merged(saved, make_module, **MODULE_KWARGS)
        expected = fitted.merged_net_.module_.state_dict()
        loaded = net.module_.state_dict()
        assert list(loaded) == list(expected)
        for name, tensor in expected.items():
            assert torch.equal(loaded[name], tensor)
        assert type(net.criterion_) is type(fitted.merged_net_.criterion_)
        assert net.predict_nonlinearity == fitted.merged_net_.predict_nonlinearity
        assert net.batch_size == fitted.merged_net_.batch_size
        assert net.device == "cpu"
        assert net.get_params()["module"] is make_module

    def test_probabilities_output_and_nllloss(self, digits, tmp_path):
        X, y = digits
        members = forked_members(X, y, n_members=2, softmax=True)
        merge = SoftMergeClassifier(members, **FAST).fit(X, y)
        path, _ = merge.save_merged(tmp_path / "softmax.safetensors")
        net = load_merged(path, make_module, softmax=True, **MODULE_KWARGS)
        assert isinstance(net.criterion_, torch.nn.NLLLoss)
        np.testing.assert_array_equal(net.predict_proba(X), merge.predict_proba(X))

    def test_sidecar_contents(self, fitted, saved):
        sidecar = read_sidecar(saved)
        assert sidecar["format"] == FORMAT
        assert sidecar["format_version"] == FORMAT_VERSION
        assert sidecar["package_version"] == sk_softmerge.__version__
        assert sidecar["classes"] == list(range(10))
        assert sidecar["n_features_in"] == 64
        assert sidecar["unit_names"] == fitted.unit_names_
        np.testing.assert_array_equal(
            np.array(sidecar["gates"], dtype=np.float32), fitted.gates_
        )
        assert sidecar["tensors"] == {
            "0.weight": {"dtype": "float32", "shape": [16, 64]},
            "0.bias": {"dtype": "float32", "shape": [16]},
            "2.weight": {"dtype": "float32", "shape": [10, 16]},
            "2.bias": {"dtype": "float32", "shape": [10]},
        }
        assert sidecar["net"] == {
            "class": "NeuralNetClassifier",
            "criterion": "CrossEntropyLoss",
            "predict_nonlinearity": "auto",
            "batch_size": 64,
        }
        data = saved.read_bytes()
        assert sidecar["weights"] == {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }

    def test_loading_never_unpickles(self, saved, monkeypatch):
        def forbidden(*args, **kwargs):
            raise AssertionError("load_merged must not unpickle")

        for owner, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
            monkeypatch.setattr(owner, name, forbidden)
        load_merged(saved, make_module, **MODULE_KWARGS)

    def test_loading_keeps_the_random_state(self, saved):
        state = torch.random.get_rng_state()
        load_merged(saved, make_module, **MODULE_KWARGS)
        assert torch.equal(torch.random.get_rng_state(), state)

    def test_device_auto(self, fitted, saved, digits):
        net = load_merged(saved, make_module, device="auto", **MODULE_KWARGS)
        expected = "cuda" if torch.cuda.is_available() else "cpu"
        assert next(net.module_.parameters()).device.type == expected
        # Another device may round differently: close, not identical.
        np.testing.assert_allclose(
            net.predict_proba(digits[0]), fitted.predict_proba(digits[0]), rtol=1e-5
        )

    def test_accepts_str_paths(self, saved):
        load_merged(str(saved), make_module, **MODULE_KWARGS)

    def test_neuron_gates(self, members, digits, tmp_path):
        X, y = digits
        merge = SoftMergeClassifier(members, **dict(FAST, granularity="neuron"))
        merge.fit(X, y)
        path, _ = merge.save_merged(tmp_path / "neuron.safetensors")
        sidecar = read_sidecar(path)
        assert sidecar["unit_names"] == merge.unit_names_
        assert len(sidecar["gates"][0]) == len(merge.unit_names_) > 2
        net = load_merged(path, make_module, **MODULE_KWARGS)
        np.testing.assert_array_equal(net.predict_proba(X), merge.predict_proba(X))


class TestSave:
    def test_save_over_existing_files(self, members, digits, path):
        other = SoftMergeClassifier(members, l0_weight=0.5, **FAST).fit(*digits)
        other.save_merged(path)
        net = load_merged(path, make_module, **MODULE_KWARGS)
        X = digits[0]
        np.testing.assert_array_equal(net.predict_proba(X), other.predict_proba(X))
        assert sorted(p.name for p in path.parent.iterdir()) == [
            "m.json",
            "m.safetensors",
        ]

    def test_failed_save_keeps_earlier_files(self, fitted, path, monkeypatch):
        before = snapshot(path.parent)

        def disk_full(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", disk_full)
        with pytest.raises(OSError, match="No space left"):
            fitted.save_merged(path)
        assert snapshot(path.parent) == before

    def test_failed_move_keeps_no_temporary_files(self, fitted, path, monkeypatch):
        def refuse(source, target):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(os, "replace", refuse)
        before = snapshot(path.parent)
        with pytest.raises(PermissionError):
            fitted.save_merged(path)
        assert snapshot(path.parent) == before

    def test_path_must_be_safetensors(self, fitted, tmp_path):
        with pytest.raises(
            ValueError, match=r"must name a '\.safetensors' file.*m\.pt"
        ):
            fitted.save_merged(tmp_path / "m.pt")
        assert list(tmp_path.iterdir()) == []

    def test_package_version_from_metadata(self, fitted, tmp_path, monkeypatch):
        def not_installed(name):
            raise importlib.metadata.PackageNotFoundError(name)

        monkeypatch.setattr(importlib.metadata, "version", not_installed)
        path, _ = fitted.save_merged(tmp_path / "m.safetensors")
        assert read_sidecar(path)["package_version"] == "unknown"
        load_merged(path, make_module, **MODULE_KWARGS)

    def test_unfitted(self, members, tmp_path):
        with pytest.raises(NotFittedError):
            SoftMergeClassifier(members).save_merged(tmp_path / "m.safetensors")
        assert list(tmp_path.iterdir()) == []

    def test_classes_that_json_cannot_hold(self, fitted, tmp_path):
        merge = copy.copy(fitted)
        merge.classes_ = np.arange(10) / 2
        with pytest.raises(ValueError, match=r"integers or strings; got classes"):
            merge.save_merged(tmp_path / "m.safetensors")
        assert list(tmp_path.iterdir()) == []

    def test_custom_predict_nonlinearity(self, fitted, tmp_path):
        merge = copy.copy(fitted)
        merge.merged_net_ = copy.deepcopy(fitted.merged_net_)
        merge.merged_net_.predict_nonlinearity = torch.sigmoid
        with pytest.raises(ValueError, match=r"'auto' or None.*got <built-in"):
            merge.save_merged(tmp_path / "m.safetensors")
        assert list(tmp_path.iterdir()) == []


class TestBadFiles:
    def test_missing_tensor(self, path):
        tensors = safetensors.torch.load_file(path)
        del tensors["2.bias"]
        rewrite_weights(path, tensors)
        assert_refused(
            path, r"weights file is missing tensors \['2.bias'\] that the module has"
        )

    def test_extra_tensor(self, path):
        tensors = safetensors.torch.load_file(path)
        tensors["3.weight"] = torch.zeros(2)
        rewrite_weights(path, tensors)
        assert_refused(
            path, r"weights file has extra tensors \['3.weight'\] that the module lacks"
        )

    def test_wrong_shape(self, path):
        tensors = safetensors.torch.load_file(path)
        tensors["0.weight"] = tensors["0.weight"][:15]
        rewrite_weights(path, tensors)
        assert_refused(
            path,
            r"'0.weight' has shape \(15, 64\) in the weights file, but \(16, 64\) in "
            "the module",
        )

    def test_wrong_dtype(self, path):
        tensors = safetensors.torch.load_file(path)
        tensors["0.bias"] = tensors["0.bias"].double()
        rewrite_weights(path, tensors)
        assert_refused(
            path,
            "'0.bias' has dtype float64 in the weights file, but float32 in the module",
        )

    def test_truncated_file(self, path):
        data = path.read_bytes()
        path.write_bytes(data[:-100])
        assert_refused(
            path, rf"has {len(data) - 100} bytes, but its sidecar records {len(data)}"
        )

    def test_tampered_bytes(self, path):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        assert_refused(path, r"SHA-256 .* was modified after saving")

    def test_valid_hash_but_not_safetensors(self, path):
        garbage = b"not a safetensors file"
        path.write_bytes(garbage)
        sidecar = read_sidecar(path)
        sidecar["weights"] = {
            "size": len(garbage),
            "sha256": hashlib.sha256(garbage).hexdigest(),
        }
        write_sidecar(path, sidecar)
        assert_refused(path, "is not a valid safetensors file")

    def test_sidecar_with_edited_shape(self, path):
        sidecar = read_sidecar(path)
        sidecar["tensors"]["0.weight"]["shape"] = [16, 65]
        write_sidecar(path, sidecar)
        assert_refused(
            path,
            r"sidecar .* does not match the weights file .*'0.weight' has shape "
            r"\(16, 64\) in the weights file, but \(16, 65\) in the sidecar",
        )

    def test_sidecar_with_edited_names(self, path):
        sidecar = read_sidecar(path)
        sidecar["tensors"]["fc.bias"] = sidecar["tensors"].pop("2.bias")
        write_sidecar(path, sidecar)
        assert_refused(
            path,
            r"does not match the weights file .*missing tensors \['fc.bias'\] that "
            r"the sidecar has; .*extra tensors \['2.bias'\] that the sidecar lacks",
        )

    def test_sidecar_with_edited_dtype(self, path):
        sidecar = read_sidecar(path)
        sidecar["tensors"]["2.weight"]["dtype"] = "float16"
        write_sidecar(path, sidecar)
        assert_refused(
            path, "'2.weight' has dtype float32 in the weights file, but float16 in"
        )

    def test_missing_sidecar(self, path):
        path.with_suffix(".json").unlink()
        assert_refused(path, r"sidecar .*m\.json.* does not exist", FileNotFoundError)

    def test_missing_weights(self, path):
        path.unlink()
        assert_refused(path, r"m\.safetensors' does not exist", FileNotFoundError)

    def test_unknown_format_version(self, path):
        sidecar = read_sidecar(path)
        sidecar["format_version"] = 2
        write_sidecar(path, sidecar)
        assert_refused(path, "has format version 2; sk_softmerge .* reads version 1")

    def test_not_a_sidecar(self, path):
        write_sidecar(path, {"weights": "elsewhere"})
        assert_refused(path, "is not an sk_softmerge merged-net sidecar")

    def test_sidecar_not_json(self, path):
        path.with_suffix(".json").write_text("{'format':")
        assert_refused(path, "is not valid JSON")

    @pytest.mark.parametrize(
        "field, value, match",
        [
            ("classes", [0.5, 1.5], "classes=.*distinct integers or of distinct str"),
            ("classes", [1, 1], "classes=.*distinct"),
            ("gates", [[1.0, 1.0]], "gates=.*one row per member"),
            ("gates", [[1.0, 1.0]] * 2 + [[1.0]], "gates=.*2 values in"),
            ("gates", [[1.0, 2.0]] * 3, r"gates=.*in \[0, 1\]"),
            ("unit_names", "0", "unit_names='0'; expected a list of strings"),
            ("n_features_in", 0, "n_features_in=0; expected a positive integer"),
        ],
    )
    def test_malformed_sidecar_field(self, path, field, value, match):
        sidecar = read_sidecar(path)
        sidecar[field] = value
        write_sidecar(path, sidecar)
        assert_refused(path, match)

    @pytest.mark.parametrize(
        "field, value, match",
        [
            ("criterion", "Module", "net.criterion='Module'; expected the class name"),
            ("criterion", "os.system", "net.criterion='os.system'"),
            ("predict_nonlinearity", "sigmoid", "net.predict_nonlinearity='sigmoid'"),
            ("class", "NeuralNet", "net.class='NeuralNet'"),
            ("class", "NeuralNetRegressor", "classes=.*expected null for a Neura"),
            ("batch_size", 0, "net.batch_size=0"),
        ],
    )
    def test_malformed_net_description(self, path, field, value, match):
        sidecar = read_sidecar(path)
        sidecar["net"][field] = value
        write_sidecar(path, sidecar)
        assert_refused(path, match)

    @pytest.mark.parametrize(
        "field, match",
        [
            ("n_features_in", "has no n_features_in; expected a positive integer"),
            ("classes", "has no classes; expected a non-empty list"),
            ("net.predict_nonlinearity", "has no net.predict_nonlinearity; expected"),
            ("weights.sha256", "has no weights.sha256; expected 64 lowercase hex"),
        ],
    )
    def test_missing_sidecar_field(self, path, field, match):
        sidecar = read_sidecar(path)
        *parents, key = field.split(".")
        owner = sidecar
        for parent in parents:
            owner = owner[parent]
        del owner[key]
        write_sidecar(path, sidecar)
        assert_refused(path, match)

    @pytest.mark.parametrize("field", ["class", "criterion"])
    def test_unhashable_net_name(self, path, field):
        sidecar = read_sidecar(path)
        sidecar["net"][field] = ["NeuralNetClassifier"]
        write_sidecar(path, sidecar)
        assert_refused(path, rf"net.{field}=\['NeuralNetClassifier'\]; expected")

    def test_module_with_other_shapes(self, path):
        assert_refused(
            path,
            r"module built by make_module\(\.\.\.\) does not match the weights file.*"
            r"'0.weight' has shape \(16, 64\) in the weights file, but \(16, 32\)",
            module_kwargs=dict(n_features=32, n_classes=10),
        )

    def test_module_with_other_names(self, path):
        assert_refused(
            path,
            r"missing tensors \['bias', 'weight'\] that the module has; the weights "
            r"file has extra tensors \['0.bias', '0.weight', '2.bias', '2.weight'\]",
            module=torch.nn.Linear,
            module_kwargs=dict(in_features=64, out_features=10),
        )

    def test_module_instance(self, path):
        assert_refused(
            path,
            "module must be the module class .* got a Sequential instance",
            TypeError,
            module=make_module(),
        )

    def test_path_must_be_safetensors(self, path):
        assert_refused(path.with_suffix(".bin"), r"must name a '\.safetensors' file")
