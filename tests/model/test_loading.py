import pytest
import torch
from torch import nn

from streamer.errors import ModelError
from streamer.model import ModelManifest, RecurrentModel, SeedNet, load_model, parse_state_dict, save_bundle


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_plain_state_dict_infers_sizes(seed_net_factory, cell):
    _, path = seed_net_factory(cell, input_dim=5, hidden_dim=12, layers=3, output_dim=2)
    manifest = load_model(path).manifest
    assert manifest.cell == cell
    assert manifest.input_size == 5
    assert manifest.hidden_size == 12
    assert manifest.num_layers == 3
    assert manifest.output_size == 2


def test_seed_keys_load_as_they_are():
    torch.manual_seed(1)
    lstm = nn.LSTM(input_size=4, hidden_size=16, num_layers=2, batch_first=True)
    fc = nn.Linear(16, 1)
    state_dict = {**{f"lstm.{k}": v for k, v in lstm.state_dict().items()},
                  **{f"fc.{k}": v for k, v in fc.state_dict().items()}}
    manifest, weights = parse_state_dict(state_dict)
    assert manifest.cell == "lstm"
    assert sorted(weights) == sorted([f"rnn.{k}" for k in lstm.state_dict()] + ["head.weight", "head.bias"])


def test_bundle_round_trip_keeps_manifest_and_fingerprint(seed_net_factory, tmp_path):
    net, path = seed_net_factory("gru", input_dim=2)
    manifest = ModelManifest("gru", 2, 16, 2, 1, feature_names=("temp", "load"), input_mean=(1.0, 2.0),
                             input_std=(0.5, 4.0), output_mean=(3.0,), output_std=(2.0,), seq_len=7)
    bundle = tmp_path / "bundle.pt"
    save_bundle(bundle, net.state_dict(), manifest)
    loaded = load_model(bundle)
    assert loaded.manifest == manifest
    assert loaded.fingerprint == load_model(bundle).fingerprint
    assert loaded.fingerprint != load_model(path).fingerprint


def test_fingerprint_changes_with_weights(seed_net_factory):
    _, first = seed_net_factory(seed=1)
    _, second = seed_net_factory(seed=2)
    assert load_model(first).fingerprint != load_model(second).fingerprint


def _seed_state_dict(**lstm_options) -> dict:
    lstm = nn.LSTM(input_size=3, hidden_size=8, num_layers=2, batch_first=True, **lstm_options)
    return {**{f"lstm.{k}": v for k, v in lstm.state_dict().items()},
            "fc.weight": torch.zeros(1, 8), "fc.bias": torch.zeros(1)}


def test_bidirectional_rejected_with_key():
    with pytest.raises(ModelError, match=r"lstm\.weight_ih_l0_reverse.*bidirectional"):
        parse_state_dict(_seed_state_dict(bidirectional=True))


def test_missing_key_named():
    state_dict = _seed_state_dict()
    del state_dict["lstm.weight_hh_l1"]
    with pytest.raises(ModelError, match=r"Missing key 'lstm\.weight_hh_l1'"):
        parse_state_dict(state_dict)


def test_unexpected_key_named():
    state_dict = _seed_state_dict()
    state_dict["extra.scale"] = torch.ones(1)
    with pytest.raises(ModelError, match=r"extra\.scale"):
        parse_state_dict(state_dict)


def test_inconsistent_shape_names_expected_and_found():
    state_dict = _seed_state_dict()
    state_dict["lstm.weight_ih_l1"] = torch.zeros(32, 5)
    with pytest.raises(ModelError, match=r"'lstm\.weight_ih_l1': expected \[32, 8\], found \[32, 5\]"):
        parse_state_dict(state_dict)


def test_head_shape_checked():
    state_dict = _seed_state_dict()
    state_dict["fc.weight"] = torch.zeros(1, 9)
    with pytest.raises(ModelError, match=r"fc\.weight"):
        parse_state_dict(state_dict)


def test_non_float_weights_rejected():
    state_dict = _seed_state_dict()
    state_dict["lstm.bias_hh_l0"] = torch.zeros(32, dtype=torch.int64)
    with pytest.raises(ModelError, match=r"'lstm\.bias_hh_l0': expected floating-point"):
        parse_state_dict(state_dict)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_rejected(value):
    state_dict = _seed_state_dict()
    state_dict["fc.bias"] = torch.full_like(state_dict["fc.bias"], value)
    with pytest.raises(ModelError, match=r"'fc\.bias': 1 of 1 weights are NaN or infinite"):
        parse_state_dict(state_dict)


def test_training_checkpoint_names_the_entry_to_save(tmp_path):
    torch.save({"state_dict": _seed_state_dict(), "epoch": 3}, tmp_path / "checkpoint.pt")
    with pytest.raises(ModelError, match=r"torch.save\(checkpoint\['state_dict'\], path\)"):
        load_model(tmp_path / "checkpoint.pt")


def test_cell_type_from_shape_not_name(caplog):
    """An nn.GRU kept under the attribute name of the nn.LSTM it replaced loads as the GRU it is."""
    torch.manual_seed(2)
    gru, head = nn.GRU(3, 8, batch_first=True), nn.Linear(8, 1)
    state_dict = {**{f"lstm.{k}": v for k, v in gru.state_dict().items()},
                  **{f"fc.{k}": v for k, v in head.state_dict().items()}}

    with caplog.at_level("WARNING", logger="streamer.model.loading"):
        manifest, weights = parse_state_dict(state_dict)

    assert manifest.cell == "gru"
    assert "Weights named lstm have the shape of a GRU" in caplog.text
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        expected = head(gru(x)[0][:, -1])
    model = RecurrentModel(manifest, weights)
    state = model.zero_state(2)
    with torch.inference_mode():
        for step in range(5):
            state, y = model.step(x[:, step], state)
    assert torch.allclose(y, expected, atol=1e-5)


def test_gate_rows_of_no_cell_rejected():
    state_dict = {"lstm.weight_ih_l0": torch.zeros(16, 3), "lstm.weight_hh_l0": torch.zeros(16, 8),
                  "fc.weight": torch.zeros(1, 8), "fc.bias": torch.zeros(1)}
    with pytest.raises(ModelError, match=r"weight_hh_l0 has 16 rows for hidden size 8; expected 4x \(LSTM\)"):
        parse_state_dict(state_dict)


def test_bundle_manifest_must_match_weights(seed_net_factory, tmp_path):
    net, _ = seed_net_factory(hidden_dim=16)
    with pytest.raises(ModelError, match="hidden_size is 32 in the manifest, 16 in the weights"):
        save_bundle(tmp_path / "b.pt", net.state_dict(), ModelManifest("lstm", 4, 32, 2, 1))


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "absent.pt")
    with pytest.raises(ModelError, match="it is a directory"):
        load_model(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="not a file written by torch.save") as raised:
        load_model(garbage)
    assert "whole module" not in str(raised.value)
    assert "weights_only" not in str(raised.value)
    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(ModelError, match="the file is empty"):
        load_model(empty)
    torch.save(_seed_state_dict(), tmp_path / "whole.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "whole.pt").read_bytes()[:2000])
    with pytest.raises(ModelError, match="a zip archive without its end"):
        load_model(truncated)


def test_whole_module_file_names_the_fix(tmp_path):
    torch.save(SeedNet(2, 4, 5, 1, 1), tmp_path / "module.pt")

    with pytest.raises(ModelError, match=r"torch.save\(net.state_dict\(\), path\)") as raised:
        load_model(tmp_path / "module.pt")
    assert "whole module saved with torch.save(net)" in str(raised.value)
    assert "weights_only" not in str(raised.value)


@pytest.mark.parametrize("broken", [{"state_dict": {}}, {"manifest": "lstm", "state_dict": {}}])
def test_bundle_without_manifest_rejected(tmp_path, broken):
    net = SeedNet(2, 4, 5, 1, 1)
    save_bundle(tmp_path / "b.pt", net.state_dict(), ModelManifest("lstm", 2, 4, 1, 1))
    payload = torch.load(tmp_path / "b.pt", weights_only=True)
    payload.pop("manifest")
    payload.update(broken, state_dict=payload["state_dict"])
    torch.save(payload, tmp_path / "broken.pt")

    with pytest.raises(ModelError, match="'manifest' is missing or not a mapping"):
        load_model(tmp_path / "broken.pt")


def test_manifest_validation():
    with pytest.raises(ModelError, match="Invalid cell type"):
        ModelManifest("lstm2", 1, 1, 1, 1)
    with pytest.raises(ModelError, match="input_std"):
        ModelManifest("lstm", 2, 1, 1, 1, input_std=(1.0, 0.0))
    with pytest.raises(ModelError, match=r"feature_names \['a'\] has 1 entries, but input_size is 2"):
        ModelManifest("lstm", 2, 1, 1, 1, feature_names=("a",))
    with pytest.raises(ModelError, match="must be distinct"):
        ModelManifest("lstm", 2, 1, 1, 1, feature_names=("a", "a"))


def test_seed_net_forward_matches_manual_loop(seed_net_factory):
    net, path = seed_net_factory("lstm", layers=3, hidden_dim=6)
    model = load_model(path)
    x = torch.randn(2, 9, 4)
    state = model.zero_state(2)
    with torch.inference_mode():
        for t in range(9):
            state, y = model.step(x[:, t], state)
        expected = net(x)
    assert torch.allclose(y, expected, atol=1e-6)
    assert isinstance(net, SeedNet)
