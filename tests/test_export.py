"""save_merged / load_merged: exact round trips, atomic saves, refused bad files.

One safetensors file holds the tensors and, in its header metadata, the JSON
document that the typed schema checks. Also the criterion's arguments (stored,
restored, or refused at save) and the check of the module against the recorded
n_features_in. Binary merges are exported in test_binary.py.
"""

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
from sk_softmerge._export import (
    CRITERION_PREFIX,
    FORMAT,
    FORMAT_VERSION,
    METADATA_KEY,
    _digest,
)
from sk_softmerge._nets import dry_run

from conftest import fork, forked_members, make_module

# Layer gates: the malformed-gates cases below count on two unit names.
FAST = dict(max_epochs=2, random_state=0, granularity="layer")
MODULE_KWARGS = dict(n_features=64, n_classes=10)


@pytest.fixture(scope="module")
def fitted(members, digits):
    return SoftMergeClassifier(members, **FAST).fit(*digits)


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    """The file of ``fitted``, written once; tests work on copies."""
    return fitted.save_merged(tmp_path_factory.mktemp("saved") / "m.safetensors")


@pytest.fixture
def path(saved, tmp_path):
    """A private copy of the saved file, free to damage."""
    shutil.copy(saved, tmp_path / saved.name)
    return tmp_path / saved.name


def read_meta(path):
    with safetensors.safe_open(path, "pt") as file:
        return json.loads(file.metadata()[METADATA_KEY])


def write_meta(path, meta, text=None):
    """Replace the file's metadata, keeping its tensors (and so its hash)."""
    text = json.dumps(meta) if text is None else text
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file(tensors, path, metadata={METADATA_KEY: text})


def rewrite_weights(path, tensors):
    """Replace the tensors and update the metadata to match: a consistent file."""
    meta = read_meta(path)
    meta["data_sha256"] = _digest(tensors)
    meta["tensors"] = {
        name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        for name, t in tensors.items()
    }
    safetensors.torch.save_file(
        tensors, path, metadata={METADATA_KEY: json.dumps(meta)}
    )


def tensor_data(path):
    """The bytes of the file after its safetensors header."""
    data = path.read_bytes()
    return data[8 + int.from_bytes(data[:8], "little") :]


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
        path = merge.save_merged(tmp_path / "softmax.safetensors")
        net = load_merged(path, make_module, softmax=True, **MODULE_KWARGS)
        assert isinstance(net.criterion_, torch.nn.NLLLoss)
        np.testing.assert_array_equal(net.predict_proba(X), merge.predict_proba(X))

    def test_metadata_contents(self, fitted, saved):
        with safetensors.safe_open(saved, "pt") as file:
            assert list(file.metadata()) == [METADATA_KEY]
            assert sorted(file.keys()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
        meta = read_meta(saved)
        assert meta["format"] == FORMAT
        assert meta["format_version"] == FORMAT_VERSION == 3
        assert meta["package_version"] == sk_softmerge.__version__
        assert meta["classes"] == list(range(10))
        assert meta["n_features_in"] == 64
        assert meta["input_shape"] == [64]
        assert meta["unit_names"] == fitted.unit_names_
        np.testing.assert_array_equal(
            np.array(meta["gates"], dtype=np.float32), fitted.gates_
        )
        assert meta["tensors"] == {
            "0.weight": {"dtype": "float32", "shape": [16, 64]},
            "0.bias": {"dtype": "float32", "shape": [16]},
            "2.weight": {"dtype": "float32", "shape": [10, 16]},
            "2.bias": {"dtype": "float32", "shape": [10]},
        }
        assert meta["net"] == {
            "class": "NeuralNetClassifier",
            "criterion": "CrossEntropyLoss",
            "criterion_arguments": {},
            "predict_nonlinearity": "auto",
            "batch_size": 64,
            "threshold": None,
        }
        assert meta["data_sha256"] == hashlib.sha256(tensor_data(saved)).hexdigest()

    def test_one_file_written(self, saved):
        assert [p.name for p in saved.parent.iterdir()] == ["m.safetensors"]

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
        path = merge.save_merged(tmp_path / "neuron.safetensors")
        meta = read_meta(path)
        assert meta["unit_names"] == merge.unit_names_
        assert len(meta["gates"][0]) == len(merge.unit_names_) > 2
        net = load_merged(path, make_module, **MODULE_KWARGS)
        np.testing.assert_array_equal(net.predict_proba(X), merge.predict_proba(X))


class TestSave:
    def test_save_over_an_existing_file(self, members, digits, path):
        other = SoftMergeClassifier(members, l0_weight=0.5, **FAST).fit(*digits)
        assert other.save_merged(path) == path
        net = load_merged(path, make_module, **MODULE_KWARGS)
        X = digits[0]
        np.testing.assert_array_equal(net.predict_proba(X), other.predict_proba(X))
        assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]

    def test_failed_save_keeps_the_earlier_file(self, fitted, path, monkeypatch):
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
        path = fitted.save_merged(tmp_path / "m.safetensors")
        assert read_meta(path)["package_version"] == "unknown"
        load_merged(path, make_module, **MODULE_KWARGS)

    def test_unfitted(self, members, tmp_path):
        with pytest.raises(NotFittedError):
            SoftMergeClassifier(members).save_merged(tmp_path / "m.safetensors")
        assert list(tmp_path.iterdir()) == []

    def test_classes_that_json_cannot_hold(self, fitted, tmp_path):
        merge = copy.copy(fitted)
        merge.classes_ = np.arange(10) / 2
        with pytest.raises(
            ValueError,
            match=r"cannot store this merge: it has classes=\[0\.0, 0\.5, .*\]; "
            "expected a list of integers or a list of strings",
        ):
            merge.save_merged(tmp_path / "m.safetensors")
        assert list(tmp_path.iterdir()) == []

    def test_state_dict_names_cannot_take_the_reserved_prefix(self):
        # Why CRITERION_PREFIX cannot clash: torch refuses such names.
        assert CRITERION_PREFIX.startswith(".")
        with pytest.raises(KeyError):
            torch.nn.Module().register_buffer(CRITERION_PREFIX + "x", torch.ones(1))

    def test_custom_predict_nonlinearity(self, fitted, tmp_path):
        merge = copy.copy(fitted)
        merge.merged_net_ = copy.deepcopy(fitted.merged_net_)
        merge.merged_net_.predict_nonlinearity = torch.sigmoid
        with pytest.raises(
            ValueError,
            match=r"it has net.predict_nonlinearity=<built-in .*; expected a string",
        ):
            merge.save_merged(tmp_path / "m.safetensors")
        assert list(tmp_path.iterdir()) == []


class TestBadFiles:
    def test_missing_tensor(self, path):
        tensors = safetensors.torch.load_file(path)
        del tensors["2.bias"]
        rewrite_weights(path, tensors)
        assert_refused(
            path, r"the file is missing tensors \['2.bias'\] that the module has"
        )

    def test_extra_tensor(self, path):
        tensors = safetensors.torch.load_file(path)
        tensors["3.weight"] = torch.zeros(2)
        rewrite_weights(path, tensors)
        assert_refused(
            path, r"the file has extra tensors \['3.weight'\] that the module lacks"
        )

    def test_wrong_shape(self, path):
        tensors = safetensors.torch.load_file(path)
        tensors["0.weight"] = tensors["0.weight"][:15].clone()
        rewrite_weights(path, tensors)
        assert_refused(
            path,
            r"'0.weight' has shape \(15, 64\) in the file, but \(16, 64\) in the "
            "module",
        )

    def test_wrong_dtype(self, path):
        tensors = safetensors.torch.load_file(path)
        tensors["0.bias"] = tensors["0.bias"].double()
        rewrite_weights(path, tensors)
        assert_refused(
            path, "'0.bias' has dtype float64 in the file, but float32 in the module"
        )

    @pytest.mark.parametrize("change", ["truncate", "extend"])
    def test_truncated_or_extended_file(self, path, change):
        data = path.read_bytes()
        path.write_bytes(data[:-100] if change == "truncate" else data + b"\0" * 8)
        assert_refused(path, r"m\.safetensors' is not a valid safetensors file")

    def test_tampered_tensor_data(self, path):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        assert_refused(
            path,
            r"has tensor data of SHA-256 [0-9a-f]{64}, but its metadata records "
            r"[0-9a-f]{64}: the file was modified after saving",
        )

    def test_not_a_safetensors_file(self, path):
        path.write_bytes(b"not a safetensors file")
        assert_refused(path, "is not a valid safetensors file")

    def test_metadata_with_edited_shape(self, path):
        meta = read_meta(path)
        meta["tensors"]["0.weight"]["shape"] = [16, 65]
        write_meta(path, meta)
        assert_refused(
            path,
            r"metadata of .* does not match the file: '0.weight' has shape "
            r"\(16, 64\) in the file, but \(16, 65\) in the metadata",
        )

    def test_metadata_with_edited_names(self, path):
        meta = read_meta(path)
        meta["tensors"]["fc.bias"] = meta["tensors"].pop("2.bias")
        write_meta(path, meta)
        assert_refused(
            path,
            r"does not match the file: the file is missing tensors \['fc.bias'\] "
            r"that the metadata has; the file has extra tensors \['2.bias'\] that "
            "the metadata lacks",
        )

    def test_metadata_with_edited_dtype(self, path):
        meta = read_meta(path)
        meta["tensors"]["2.weight"]["dtype"] = "float16"
        write_meta(path, meta)
        assert_refused(
            path, "'2.weight' has dtype float32 in the file, but float16 in the meta"
        )

    def test_missing_file(self, path):
        path.unlink()
        assert_refused(path, r"m\.safetensors' does not exist", FileNotFoundError)

    def test_foreign_safetensors_file(self, path):
        # A plain state dict, or a file of format 2 (its JSON was a sidecar).
        tensors = safetensors.torch.load_file(path)
        old = {"format": FORMAT, "format_version": "2"}
        safetensors.torch.save_file(tensors, path, metadata=old)
        assert_refused(
            path,
            r"is not an sk_softmerge merged net: its safetensors metadata has no "
            r"'sk_softmerge' entry, only \['format', 'format_version'\]",
        )

    @pytest.mark.parametrize("version", [1, 2, 4, 0, True, "3", None])
    def test_unknown_format_version(self, path, version):
        meta = read_meta(path)
        meta["format_version"] = version
        write_meta(path, meta)
        assert_refused(
            path, f"has format version {version!r}; sk_softmerge .* reads version 3\\."
        )

    def test_not_a_merged_net(self, path):
        write_meta(path, {"weights": "elsewhere"})
        assert_refused(path, "is not an sk_softmerge merged net: expected format")

    def test_metadata_not_json(self, path):
        write_meta(path, None, text="{'format':")
        assert_refused(path, "has metadata that is not JSON")

    @pytest.mark.parametrize(
        "field, value, match",
        [
            ("classes", [0.5, 1.5], "classes=.*list of integers or a list of str"),
            ("classes", [1, 1], "classes=.*distinct"),
            ("classes", [], "classes=.*non-empty"),
            ("gates", [[1.0, 1.0]], "gates=.*one row per member"),
            ("gates", [[1.0, 1.0]] * 2 + [[1.0]], "gates=.*2 values in"),
            ("gates", [[1.0, 2.0]] * 3, r"gates=.*in \[0, 1\]"),
            ("gates", [[1.0, float("nan")]] * 2, "gates=.*lists of finite numbers"),
            ("unit_names", "0", "unit_names='0'; expected a list of strings"),
            ("n_features_in", 0, "n_features_in=0; expected a positive integer"),
            ("n_features_in", True, "n_features_in=True; expected an integer"),
            ("input_shape", [32], r"input_shape=\[32\]; expected null or a list .* 64"),
            ("input_shape", [], r"input_shape=\[\]; expected null or a list"),
            ("input_shape", 64, "input_shape=64; expected a list of integers or null"),
            ("data_sha256", 5, "data_sha256=5; expected a string"),
            ("tensors", [], r"tensors=\[\]; expected a mapping of strings to objects"),
        ],
    )
    def test_malformed_field(self, path, field, value, match):
        meta = read_meta(path)
        meta[field] = value
        write_meta(path, meta)
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
            ("threshold", 0.5, "net.threshold=0.5; expected null"),
        ],
    )
    def test_malformed_net_description(self, path, field, value, match):
        meta = read_meta(path)
        meta["net"][field] = value
        write_meta(path, meta)
        assert_refused(path, match)

    def test_tensor_spec_without_dtype(self, path):
        meta = read_meta(path)
        del meta["tensors"]["0.bias"]["dtype"]
        write_meta(path, meta)
        assert_refused(path, "has no tensors.0.bias.dtype; expected a string")

    @pytest.mark.parametrize(
        "field, match",
        [
            ("n_features_in", "has no n_features_in; expected an integer"),
            ("classes", "has no classes; expected a list of integers or a list"),
            ("net.predict_nonlinearity", "has no net.predict_nonlinearity; expected"),
            ("data_sha256", "has no data_sha256; expected a string"),
            ("net.criterion_arguments", "has no net.criterion_arguments; expected"),
            ("net.threshold", "has no net.threshold; expected a finite number or"),
            ("input_shape", "has no input_shape; expected a list of integers or null"),
            ("net", "has no net; expected an object with class, criterion"),
        ],
    )
    def test_missing_field(self, path, field, match):
        meta = read_meta(path)
        *parents, key = field.split(".")
        owner = meta
        for parent in parents:
            owner = owner[parent]
        del owner[key]
        write_meta(path, meta)
        assert_refused(path, match)

    @pytest.mark.parametrize("field", ["class", "criterion"])
    def test_unhashable_net_name(self, path, field):
        meta = read_meta(path)
        meta["net"][field] = ["NeuralNetClassifier"]
        write_meta(path, meta)
        assert_refused(path, rf"net.{field}=\['NeuralNetClassifier'\]; expected")

    def test_module_with_other_shapes(self, path):
        assert_refused(
            path,
            r"module built by make_module\(\.\.\.\) does not match the file.*"
            r"'0.weight' has shape \(16, 64\) in the file, but \(16, 32\)",
            module_kwargs=dict(n_features=32, n_classes=10),
        )

    def test_module_with_other_names(self, path):
        assert_refused(
            path,
            r"missing tensors \['bias', 'weight'\] that the module has; the file "
            r"has extra tensors \['0.bias', '0.weight', '2.bias', '2.weight'\]",
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


@pytest.fixture(scope="module")
def weighted(digits):
    """A merge of members with criterion arguments of every kind, and its files."""
    X, y = digits
    arguments = dict(
        criterion__weight=torch.linspace(0.5, 1.5, 10),
        criterion__label_smoothing=0.1,
        criterion__reduction="mean",
        criterion__ignore_index=-1,
    )
    members = forked_members(X, y, n_members=2, **arguments)
    merge = SoftMergeClassifier(members, **FAST).fit(X, y)
    return merge


def assert_same_criterion(criterion, expected):
    assert type(criterion) is type(expected)
    for name in ("reduction", "label_smoothing", "ignore_index"):
        assert getattr(criterion, name) == getattr(expected, name), name
    assert criterion.weight.dtype == expected.weight.dtype
    assert torch.equal(criterion.weight, expected.weight)


class TestCriterionArguments:
    def test_round_trip(self, weighted, digits, tmp_path):
        X, _ = digits
        path = weighted.save_merged(tmp_path / "weighted.safetensors")
        assert read_meta(path)["net"]["criterion_arguments"] == {
            "label_smoothing": 0.1,
            "reduction": "mean",
            "ignore_index": -1,
        }
        # The tensor argument is a tensor of the file, under the reserved prefix.
        stored = safetensors.torch.load_file(path)[CRITERION_PREFIX + "weight"]
        assert torch.equal(stored, torch.linspace(0.5, 1.5, 10))
        assert read_meta(path)["tensors"][CRITERION_PREFIX + "weight"] == {
            "dtype": "float32",
            "shape": [10],
        }
        net = load_merged(path, make_module, **MODULE_KWARGS)
        assert_same_criterion(net.criterion_, weighted.merged_net_.criterion_)
        assert net.get_params()["criterion__label_smoothing"] == 0.1
        np.testing.assert_array_equal(net.predict_proba(X), weighted.predict_proba(X))

    def test_criterion_without_arguments_is_the_default(self, saved):
        net = load_merged(saved, make_module, **MODULE_KWARGS)
        default = torch.nn.CrossEntropyLoss()
        assert net.criterion_.weight is None
        assert net.criterion_.label_smoothing == default.label_smoothing
        assert net.criterion_.ignore_index == default.ignore_index

    @pytest.mark.parametrize(
        "tensor",
        [
            torch.tensor([1 / 3, 1e-30, -2.5e30, 0.0], dtype=torch.float64),
            torch.tensor([1 / 3, 65504.0, 6e-8], dtype=torch.float16),
            torch.tensor([[1 / 3, 3e38], [-1e-38, 7.0]], dtype=torch.bfloat16),
            torch.tensor(1 / 3),
            torch.tensor([2**62, -(2**63)], dtype=torch.int64),
            torch.tensor([255, 0], dtype=torch.uint8),
            torch.tensor([True, False]),
            torch.zeros(0, 3),
        ],
    )
    def test_tensors_are_written_exactly(self, path, tensor):
        tensors = safetensors.torch.load_file(path)
        tensors[CRITERION_PREFIX + "weight"] = tensor
        rewrite_weights(path, tensors)
        loaded = load_merged(path, make_module, **MODULE_KWARGS).criterion_.weight
        assert loaded.dtype == tensor.dtype
        assert loaded.shape == tensor.shape
        assert torch.equal(loaded, tensor)

    @pytest.mark.parametrize(
        "name, value, match",
        [
            ("ignore_index", lambda target: -1, r"criterion__ignore_index is <func"),
            (
                "ignore_index",
                object(),
                r"criterion__ignore_index is <object .*, of type obj",
            ),
            (
                "ignore_index",
                [1, 2],
                r"criterion__ignore_index is \[1, 2\], of type list",
            ),
            ("ignore_index", np.array([1]), r"criterion__ignore_index is array"),
            (
                "label_smoothing",
                float("nan"),
                "finite numbers.*label_smoothing is nan",
            ),
            ("weight", torch.full((10,), np.inf), "finite tensors; criterion__weight"),
            (
                "weight",
                torch.ones(10, dtype=torch.complex64),
                "criterion__weight has dtype complex64",
            ),
        ],
    )
    def test_other_values_refused_at_save(self, fitted, tmp_path, name, value, match):
        merge = copy.copy(fitted)
        merge.merged_net_ = copy.deepcopy(fitted.merged_net_)
        merge.merged_net_.set_params(**{f"criterion__{name}": value})
        with pytest.raises(ValueError, match=match):
            merge.save_merged(tmp_path / "m.safetensors")
        assert list(tmp_path.iterdir()) == []

    def test_criterion_changed_after_fit_refused(self, fitted, tmp_path):
        merge = copy.copy(fitted)
        merge.merged_net_ = copy.deepcopy(fitted.merged_net_)
        merge.merged_net_.criterion_.label_smoothing = 0.2
        with pytest.raises(
            ValueError,
            match=r"criterion is not torch.nn.CrossEntropyLoss\(\): its "
            r"label_smoothing is 0.2, not 0.0",
        ):
            merge.save_merged(tmp_path / "m.safetensors")
        assert list(tmp_path.iterdir()) == []

    def test_criterion_instance_refused(self, fitted, tmp_path):
        merge = copy.copy(fitted)
        merge.merged_net_ = copy.deepcopy(fitted.merged_net_)
        merge.merged_net_.set_params(
            criterion=torch.nn.CrossEntropyLoss(weight=torch.ones(10))
        )
        with pytest.raises(
            ValueError, match=r"its weight is tensor\(\[1\., .*\]\), not None\. Pass"
        ):
            merge.save_merged(tmp_path / "m.safetensors")
        assert list(tmp_path.iterdir()) == []

    @pytest.mark.parametrize(
        "arguments, match",
        [
            ([], r"net.criterion_arguments=\[\]; expected a mapping of strings to"),
            (
                {"os_system": 1},
                r"net.criterion_arguments=\{'os_system': 1\}; expected a mapping "
                r"from arguments of torch.nn.CrossEntropyLoss \(ignore_index, ",
            ),
            (
                {"weight": {"dtype": "float32", "shape": [1], "values": [1.0]}},
                "net.criterion_arguments=.*; expected a mapping of strings to "
                "integers or finite numbers or strings or booleans or null",
            ),
            ({"label_smoothing": np.inf}, "net.criterion_arguments=.*inf"),
            ({"reduction": ["mean"]}, "net.criterion_arguments="),
            (
                {"weight": 5},
                r"net.criterion_arguments=\{'weight': 5\} and tensors \[\], which "
                "do not build a torch.nn.CrossEntropyLoss",
            ),
        ],
    )
    def test_malformed_arguments_refused(self, path, arguments, match):
        meta = read_meta(path)
        meta["net"]["criterion_arguments"] = arguments
        write_meta(path, meta)
        assert_refused(path, match)

    @pytest.mark.parametrize(
        "name, tensor, arguments",
        [
            ("os_system", torch.ones(1), {}),
            ("weight", torch.ones(10, dtype=torch.float8_e4m3fn), {}),
            ("weight", torch.ones(10), {"weight": None}),
        ],
    )
    def test_malformed_tensor_arguments_refused(self, path, name, tensor, arguments):
        tensors = safetensors.torch.load_file(path)
        tensors[CRITERION_PREFIX + name] = tensor
        rewrite_weights(path, tensors)
        meta = read_meta(path)
        meta["net"]["criterion_arguments"] = arguments
        write_meta(path, meta)
        assert_refused(
            path,
            r"has tensors=.*; expected the tensors named '\.criterion\.' \+ an "
            r"argument of torch.nn.CrossEntropyLoss \(.*\) of dtype bfloat16, bool",
        )


def unflattening_module(n_features=64, n_classes=10):
    """make_module's weights, but a layer that cannot take its features."""
    return torch.nn.Sequential(
        torch.nn.Linear(n_features, 16),
        torch.nn.Unflatten(1, (4, 4)),
        torch.nn.Linear(16, n_classes),
    )


def make_cnn(n_classes=10):
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, n_classes),
    )


class TestInputShape:
    def test_module_that_cannot_take_the_features_refused(self, path):
        assert_refused(
            path,
            r"module built by unflattening_module\(\.\.\.\) does not take the inputs "
            r"that the merge was fitted on: the file .* records n_features_in=64, "
            r"and a batch of zeros of shape \(2, 64\) failed",
            module=unflattening_module,
        )

    def test_metadata_with_other_n_features_refused(self, path):
        meta = read_meta(path)
        meta["n_features_in"], meta["input_shape"] = 32, [32]
        write_meta(path, meta)
        assert_refused(
            path, r"records n_features_in=32, and a batch of zeros of shape \(2, 32\)"
        )

    def test_images_skip_the_check(self, digits, tmp_path):
        # Images of shape (1, 8, 8): n_features_in_ is 1 (the channels), which
        # does not tell the input shape, so no shape is recorded or checked.
        X, y = digits
        images = X.reshape(-1, 1, 8, 8)
        torch.manual_seed(0)
        shared = NeuralNetClassifier(
            make_cnn(),
            criterion=torch.nn.CrossEntropyLoss,
            lr=0.2,
            max_epochs=2,
            train_split=None,
            verbose=0,
        ).fit(images, y)
        members = fork(shared, images, y, 2, 0, max_epochs=1)
        merge = SoftMergeClassifier(members, **FAST).fit(images, y)
        assert merge.n_features_in_ == 1
        path = merge.save_merged(tmp_path / "cnn.safetensors")
        meta = read_meta(path)
        assert meta["n_features_in"] == 1
        assert meta["input_shape"] is None
        net = load_merged(path, make_cnn)
        np.testing.assert_array_equal(
            net.predict_proba(images), merge.predict_proba(images)
        )

    def test_dry_run_changes_nothing(self):
        module = torch.nn.Sequential(
            torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5)
        )
        module[2].eval()  # modes that differ between submodules are kept
        before = copy.deepcopy(module.state_dict())
        rng_state = torch.random.get_rng_state()
        dry_run(module, [4])
        assert [m.training for m in module.modules()] == [True, True, True, False]
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, before[name]), name
        assert torch.equal(torch.random.get_rng_state(), rng_state)
        with pytest.raises(RuntimeError):
            dry_run(module, [5])
        assert [m.training for m in module.modules()] == [True, True, True, False]
