"""--bf16 / --channels_last auto (fast_path_selection.py): bf16 is a CPU candidate only with bf16 matrix units, the probe
picks the fastest candidate but never one no faster than fp32 NCHW, the choice is cached, recorded in config.json
and kept on resume, in stage 2 and in scoring; every mode computes the fp32 maths within a stated tolerance.
This CPU may lack AMX: each branch of the hardware query and of the probe is forced here."""
import json
import os

import pytest
import torch
from conftest import TINY_FLAGS
from test_real_world_failures import small_disk  # noqa: F401 (a fixture)

import main
from brainomaly.errors import UserError
from brainomaly.train import fast_path_selection, stage1_gan

AUTO = ["--bf16", "auto", "--channels_last", "auto"]
PLAIN, CHANNELS_LAST, BF16, BF16_CHANNELS_LAST = (False, False), (False, True), (True, False), (True, True)


def fake_probe(seconds_by_mode, calls):
    """A probe_seconds stand-in: records the candidates it was asked about and returns the given timings."""
    def probe(config, device, modes, rounds=fast_path_selection.PROBE_ROUNDS):
        calls.append(list(modes))
        return {mode: seconds_by_mode[mode] for mode in modes}
    return probe


def with_bf16_units(monkeypatch, amx, avx512_bf16=False):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


def config(*flags):
    return main.parse_config([*TINY_FLAGS, "--device", "cpu", *flags])


# ----------------------------------------------------------------------------------------------------------- flags

def test_channels_last_keeps_true_false_as_on_off_and_refuses_other_words(capsys):
    assert config("--channels_last", "true").channels_last == "on"
    assert config("--channels_last", "False").channels_last == "off"
    assert config("--channels_last", "auto", "--bf16", "auto").channels_last == "auto"
    assert fast_path_selection.switch(True) == "on" and fast_path_selection.switch(False) == "off"  # an old config.json's booleans
    with pytest.raises(SystemExit) as exit_info:
        config("--channels_last", "fast")
    assert exit_info.value.code == 2
    assert "argument --channels_last: expected auto, on or off, got 'fast'" in capsys.readouterr().err


def test_auto_is_the_default():
    defaults = main.parse_config([])
    assert (defaults.bf16, defaults.channels_last) == ("auto", "auto")


# ---------------------------------------------------------------------------------------------- the auto choice

@pytest.mark.parametrize("amx,avx512_bf16,expected", [
    (False, False, [PLAIN, CHANNELS_LAST]),  # AVX2 / AVX512 without bf16: emulated bf16 is never tried
    (True, False, [PLAIN, CHANNELS_LAST, BF16, BF16_CHANNELS_LAST]),
    (False, True, [PLAIN, CHANNELS_LAST, BF16, BF16_CHANNELS_LAST]),
], ids=["no_bf16_units", "amx", "avx512_bf16"])
def test_bf16_is_a_cpu_candidate_only_with_bf16_matrix_units(monkeypatch, amx, avx512_bf16, expected):
    with_bf16_units(monkeypatch, amx, avx512_bf16)
    calls = []
    monkeypatch.setattr(fast_path_selection, "probe_seconds", fake_probe(
        {PLAIN: 1.0, CHANNELS_LAST: 0.8, BF16: 0.5, BF16_CHANNELS_LAST: 0.3}, calls))
    chosen = fast_path_selection.resolve(config(*AUTO), torch.device("cpu"))
    assert calls == [expected]
    assert (chosen["bf16"], chosen["channels_last"]) == expected[-1]  # the fastest of what was probed
    assert chosen["probe_seconds"] == {fast_path_selection.mode_name(*m): s for m, s in
                                       zip(expected, [1.0, 0.8, 0.5, 0.3])}


def test_forced_switches_narrow_the_probe_and_two_forced_switches_skip_it(monkeypatch):
    with_bf16_units(monkeypatch, amx=True)
    calls = []
    monkeypatch.setattr(fast_path_selection, "probe_seconds", fake_probe(
        {PLAIN: 1.0, CHANNELS_LAST: 0.8, BF16: 0.5, BF16_CHANNELS_LAST: 0.3}, calls))
    cpu = torch.device("cpu")
    assert fast_path_selection.resolve(config("--bf16", "off", "--channels_last", "auto"), cpu)["channels_last"] is True
    assert fast_path_selection.resolve(config("--bf16", "auto", "--channels_last", "off"), cpu)["bf16"] is True
    assert calls == [[PLAIN, CHANNELS_LAST], [PLAIN, BF16]]
    forced = fast_path_selection.resolve(config("--bf16", "on", "--channels_last", "off"), cpu)
    assert (forced["bf16"], forced["channels_last"], forced["probe_seconds"]) == (True, False, None)
    assert len(calls) == 2  # no probe


def test_cuda_auto_is_bf16_on_channels_last_off_without_a_probe(monkeypatch):
    monkeypatch.setattr(fast_path_selection, "machine", lambda device: {"device": "cuda", "gpu": "H200", "torch": "x"})
    monkeypatch.setattr(fast_path_selection, "probe_seconds", lambda *a, **k: pytest.fail("probed on CUDA"))
    chosen = fast_path_selection.resolve(config(*AUTO), torch.device("cuda"))
    assert (chosen["bf16"], chosen["channels_last"]) == (True, False)


@pytest.mark.parametrize("seconds,expected", [
    ({PLAIN: 1.00, CHANNELS_LAST: 0.97}, PLAIN),  # 3% faster: within noise, the plain path stays
    ({PLAIN: 1.00, CHANNELS_LAST: 0.90}, CHANNELS_LAST),
    ({PLAIN: 1.00, CHANNELS_LAST: 1.40}, PLAIN),
    ({PLAIN: 1.00, CHANNELS_LAST: 0.8, BF16: 1.9, BF16_CHANNELS_LAST: 0.35}, BF16_CHANNELS_LAST),
    ({PLAIN: 1.00, CHANNELS_LAST: 0.8, BF16: 1.9, BF16_CHANNELS_LAST: 1.2}, CHANNELS_LAST),  # bf16 slower: not it
    ({BF16: 0.50, BF16_CHANNELS_LAST: 0.49}, BF16_CHANNELS_LAST),  # --bf16 on: fp32 NCHW not a candidate
])
def test_the_probe_never_picks_a_path_no_faster_than_fp32_nchw(seconds, expected):
    assert fast_path_selection.pick(seconds) == expected


def test_the_probe_is_cached_per_machine_and_sizes_in_the_models_folder(monkeypatch, tmp_path):
    with_bf16_units(monkeypatch, amx=False)
    calls = []
    monkeypatch.setattr(fast_path_selection, "probe_seconds", fake_probe({PLAIN: 1.0, CHANNELS_LAST: 0.5}, calls))
    cpu, folder = torch.device("cpu"), str(tmp_path / "models")
    first = fast_path_selection.resolve(config(*AUTO), cpu, folder)
    again = fast_path_selection.resolve(config(*AUTO), cpu, folder)
    assert len(calls) == 1 and again["channels_last"] is True and "cached probe" in again["reason"]
    assert "probe of" in first["reason"] and "cached" not in first["reason"]
    with open(os.path.join(folder, fast_path_selection.PROBE_FILE)) as f:
        (key,) = json.load(f)
    assert json.loads(key)["machine"]["cpu_model"] == fast_path_selection.cpu_model()
    assert json.loads(key)["sizes"]["image_size"] == 32
    fast_path_selection.resolve(config(*AUTO, "--image_size", "16"), cpu, folder)  # other sizes: probed again
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)  # another machine (thread count) too
    fast_path_selection.resolve(config(*AUTO), cpu, folder)
    assert len(calls) == 3


def test_the_real_probe_times_every_candidate_and_leaves_the_random_state_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    seconds = fast_path_selection.probe_seconds(config(*AUTO, "--image_size", "16"), torch.device("cpu"),
                                      [PLAIN, CHANNELS_LAST], rounds=1)
    assert set(seconds) == {PLAIN, CHANNELS_LAST} and all(0 < s < 60 for s in seconds.values())
    assert torch.equal(torch.get_rng_state(), before)  # a probed run draws the weights a cached one draws


def test_a_probe_cache_that_cannot_be_written_is_one_message_and_leaves_no_torn_file(monkeypatch, small_disk):
    monkeypatch.setattr(fast_path_selection, "probe_seconds", fake_probe({PLAIN: 1.0, CHANNELS_LAST: 0.5}, []))
    with open(os.path.join(small_disk, "filler"), "wb") as f:  # the whole disk
        with pytest.raises(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    with pytest.raises(UserError, match=fast_path_selection.PROBE_FILE):
        fast_path_selection.probe_cached(config(*AUTO), torch.device("cpu"), [PLAIN, CHANNELS_LAST], small_disk, writes=True)
    assert sorted(os.listdir(small_disk)) == ["filler"]


def test_the_probe_times_the_networks_the_run_trains(monkeypatch):
    timed = []
    real_step = stage1_gan.train_step
    monkeypatch.setattr(stage1_gan, "train_step", lambda runtime, c, state, *rest, **options: timed.append(
        state.generator) or real_step(runtime, c, state, *rest, **options))
    probe = config(*AUTO, "--image_size", "16", "--map_init", "identity")
    fast_path_selection.probe_seconds(probe, torch.device("cpu"), [PLAIN], rounds=1)
    # the run's generator, identity-initialised (x_c = x at iteration 0), not a zero-map one of the same widths
    assert timed and all(g.identity_map for g in timed)


# ------------------------------------------------------------------------- recorded, honoured, changed machine

def train(toy_dataset, run_dir, *extra):
    return main.main(["--mode", "train", "--image_dir", toy_dataset, "--run_dir", run_dir, *TINY_FLAGS, *AUTO,
                      "--preload", "on", "--model_save_step", "2", *extra])


def test_the_auto_choice_is_recorded_and_kept_on_resume_in_stage_2_and_in_scoring(toy_dataset, tmp_path,
                                                                                   monkeypatch, capsys):
    with_bf16_units(monkeypatch, amx=False)
    calls = []
    monkeypatch.setattr(fast_path_selection, "probe_seconds", fake_probe({PLAIN: 1.0, CHANNELS_LAST: 0.5}, calls))
    run_dir = str(tmp_path / "run")
    assert train(toy_dataset, run_dir, "--num_iters", "2") == 0
    out = capsys.readouterr().out
    assert out.count("Fast path: fp32 channels_last (no bf16 matrix units on this CPU") == 1
    with open(os.path.join(run_dir, "models", "config.json")) as f:
        recorded = json.load(f)["fast_path"]
    assert (recorded["bf16"], recorded["channels_last"], recorded["channels_last_flag"]) == (False, True, "auto")
    assert recorded["machine"]["cpu_model"] == fast_path_selection.cpu_model()
    saved = torch.load(os.path.join(run_dir, "models", "2-G.ckpt"), weights_only=True)["config"]["fast_path"]
    assert saved["channels_last"] is True

    # the machine now finds NCHW faster: a resume still trains as the run chose, without probing
    monkeypatch.setattr(fast_path_selection, "probe_seconds", fake_probe({PLAIN: 0.1, CHANNELS_LAST: 0.5}, calls))
    assert train(toy_dataset, run_dir, "--num_iters", "4", "--resume_iters", "latest") == 0
    out = capsys.readouterr().out
    assert "Fast path: fp32 channels_last (the run's choice: no bf16" in out and "was chosen on" not in out
    assert len(calls) == 1
    test = ["--image_dir", toy_dataset, "--run_dir", run_dir, *TINY_FLAGS, *AUTO]
    assert main.main(["--mode", "train_refiner", *test, "--refine_from", "4", "--refiner_iters", "2"]) == 0
    assert main.main(["--mode", "test_inductive", *test, "--test_iters", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("Fast path: fp32 channels_last (the run's choice") == 2 and len(calls) == 1
    refiner = torch.load(os.path.join(run_dir, "models", "4-R.ckpt"), weights_only=True)["config"]["fast_path"]
    assert refiner["channels_last"] is True

    # a flag still wins; and on another CPU the run says so in one line
    this_cpu = fast_path_selection.cpu_model()
    monkeypatch.setattr(fast_path_selection, "cpu_model", lambda: "Another CPU 9000")
    assert main.main(["--mode", "test_inductive", *test, "--test_iters", "4", "--channels_last", "off"]) == 0
    out = capsys.readouterr().out
    assert "Fast path: fp32 NCHW (the run's choice: " in out and "now --channels_last off" in out
    (note,) = [line for line in out.splitlines() if "was chosen on" in line]
    assert note.startswith(f"This run's fast path (fp32 channels_last) was chosen on {this_cpu} (")
    assert "this machine is Another CPU 9000 (" in note and note.endswith("on/off choose another.")


def test_a_bf16_choice_is_dropped_on_a_cpu_without_bf16_units_and_kept_where_it_has_them(monkeypatch):
    cpu = torch.device("cpu")
    with_bf16_units(monkeypatch, amx=True)
    chosen_on_amx = fast_path_selection.resolve(config("--bf16", "on", "--channels_last", "on"), cpu)
    kept, note = fast_path_selection.adopt(config(*AUTO), cpu, chosen_on_amx)
    assert (kept["bf16"], kept["channels_last"], note) == (True, True, None)  # same machine: silent
    with_bf16_units(monkeypatch, amx=False)
    moved, note = fast_path_selection.adopt(config(*AUTO), cpu, chosen_on_amx)
    assert (moved["bf16"], moved["channels_last"]) == (False, True)
    assert "AMX" in note and "no bf16 matrix units, so bf16 is off here (--bf16 on forces it)" in note
    forced, _ = fast_path_selection.adopt(config("--bf16", "on", "--channels_last", "auto"), cpu, chosen_on_amx)
    assert forced["bf16"] is True


# ---------------------------------------------------------------------------------------------- the same maths

ITERATIONS = 4  # two critic-only and two critic+generator iterations


def stage1_steps(*flags):
    """(losses per iteration, initial weights, final weights, optimiser states) of train_step on fixed batches."""
    from brainomaly.run.networks import build_stage1
    from brainomaly.train.stage1_gan import Stage1State, train_step
    from brainomaly.train.training_loop import adam
    from solver import Solver
    solver = Solver(config(*flags))
    c, runtime = solver.config, solver.runtime
    c = runtime.settle_fast_path(c)
    torch.manual_seed(0)
    generator, critic = build_stage1(runtime, c)
    initial = {**{f"G.{k}": v.detach().clone() for k, v in generator.state_dict().items()},
               **{f"D.{k}": v.detach().clone() for k, v in critic.state_dict().items()}}
    optimizers = [adam(n.parameters(), c.g_lr, (c.beta1, c.beta2), c, runtime.device) for n in (generator, critic)]
    g = torch.Generator().manual_seed(1)
    x_mixed, x_healthy = (torch.rand(c.batch_size, 1, c.image_size, c.image_size, generator=g) * 2 - 1
                          for _ in range(2))
    losses = []
    for i in range(ITERATIONS):
        alpha = torch.rand(c.batch_size, 1, 1, 1, generator=g)
        state = Stage1State(generator=generator, critic=critic, g_optimizer=optimizers[0], d_optimizer=optimizers[1])
        losses.append(train_step(runtime, c, state, x_mixed, x_healthy, alpha, update_generator=i % 2 == 1))
    final = {**{f"G.{k}": v.detach() for k, v in generator.state_dict().items()},
             **{f"D.{k}": v.detach() for k, v in critic.state_dict().items()}}
    states = [s for o in optimizers for state in o.state.values() for s in state.values() if torch.is_tensor(s)]
    return losses, initial, final, states


@pytest.fixture(scope="module")
def fp32_nchw():
    return stage1_steps("--bf16", "off", "--channels_last", "off")


def update_cosine(initial, final, reference_final):
    """Cosine similarity of the whole weight update (all parameters as one vector) against the reference's."""
    ours = torch.cat([(final[k] - initial[k]).flatten() for k in initial])
    theirs = torch.cat([(reference_final[k] - initial[k]).flatten() for k in initial])
    return float(torch.nn.functional.cosine_similarity(ours, theirs, dim=0))


def test_bf16_training_keeps_fp32_losses_weights_and_optimiser_states_within_bf16_tolerance(fp32_nchw):
    plain_losses, initial, plain_final, _ = fp32_nchw
    losses, bf16_initial, final, states = stage1_steps("--bf16", "on", "--channels_last", "on")
    assert all(torch.equal(bf16_initial[k], v) for k, v in initial.items())  # the same start
    for ours, theirs in zip(losses, plain_losses):
        assert set(ours) == set(theirs)
        for key, value in ours.items():
            assert value.dtype == torch.float32, key  # logged and checked in fp32, not bf16's 3 digits
            # stated bf16 tolerance: 1% relative or 3e-4 absolute (bf16 keeps 8 significant bits)
            assert float(value) == pytest.approx(float(theirs[key]), rel=1e-2, abs=3e-4), key
    assert all(v.dtype == torch.float32 for v in final.values())
    assert states and all(s.dtype == torch.float32 for s in states if s.numel() > 1)  # Adam's moments
    # Adam moves every weight by about the learning rate per step whatever the precision, so the weights are
    # compared by the direction of their whole update: bf16's rounding must not turn it
    assert update_cosine(initial, final, plain_final) > 0.9


def test_channels_last_training_matches_nchw_within_float_rounding(fp32_nchw):
    plain_losses, initial, plain_final, _ = fp32_nchw
    losses, _, final, _ = stage1_steps("--bf16", "off", "--channels_last", "on")
    for ours, theirs in zip(losses, plain_losses):
        for key, value in ours.items():
            assert float(value) == pytest.approx(float(theirs[key]), rel=1e-4, abs=1e-6), key
    for name, value in plain_final.items():
        assert torch.allclose(final[name], value, rtol=1e-4, atol=1e-6), name


@pytest.fixture(scope="module")
def scoring_inputs():
    from diffusion_refiner import RefinerUNet, ResidualDiffusion
    from model import Generator
    c = config("--bf16", "off", "--channels_last", "off")
    torch.manual_seed(3)
    generator = Generator(1, c.g_conv_dim, c.g_repeat_num, zero_map=False)  # a non-zero map to score
    unet = RefinerUNet(1, c.refiner_dim, tuple(c.refiner_dim_mults), c.refiner_blocks, c.refiner_attn_levels,
                       c.refiner_heads)
    refiner = ResidualDiffusion(unet, c.diffusion_steps)
    x = torch.rand(6, 1, c.image_size, c.image_size, generator=torch.Generator().manual_seed(4)) * 2 - 1
    x[:, :, :4] = -1  # background rows outside the head
    return generator.state_dict(), refiner.state_dict(), x


def score_in_mode(scoring_inputs, bf16, channels_last):
    from brainomaly.evaluate import scoring, scoring_networks
    from brainomaly.run import networks
    from solver import Solver
    g_state, r_state, x = scoring_inputs
    solver = Solver(config("--bf16", bf16, "--channels_last", channels_last))
    runtime, c = solver.runtime, solver.runtime.settle_fast_path(solver.config)
    generator, _ = networks.build_stage1(runtime, c)
    generator.load_state_dict(g_state)
    refiner = networks.build_refiner(runtime, c)
    refiner.load_state_dict(r_state)
    scored = scoring_networks.ScoringNetworks(1, generator.eval(), refiner.eval(), c, {})
    names = [f"p{i}_slice{i}.png" for i in range(len(x))]
    batch = scoring.score_batch(runtime, scored, x, names, list(range(len(x))))
    coarse = scoring.map_and_scores(x, batch.coarse, c.score_region)
    return batch, coarse


@pytest.mark.parametrize("bf16,channels_last,rel", [("off", "on", 1e-5), ("on", "off", 2e-2), ("on", "on", 2e-2)],
                         ids=["channels_last", "bf16", "bf16_channels_last"])
def test_scoring_in_each_mode_gives_fp32_slice_scores_within_tolerance(scoring_inputs, bf16, channels_last, rel):
    plain, plain_coarse = score_in_mode(scoring_inputs, "off", "off")
    batch, coarse = score_in_mode(scoring_inputs, bf16, channels_last)
    assert batch.anomaly_map.dtype == torch.float32 and batch.scores.dtype.name == "float64"
    assert batch.coarse.dtype == torch.float32 and batch.refined.dtype == torch.float32
    assert plain.scores.min() > 1e-3  # the scores compared are not all zero
    # stated tolerance: refined and coarse slice scores within 2% (bf16) or 1e-5 (channels_last), relative
    assert batch.scores == pytest.approx(plain.scores, rel=rel)
    assert coarse[1] == pytest.approx(plain_coarse[1], rel=rel)


def test_instance_norm_keeps_channels_last_and_normalises_as_the_stock_norm():
    from model import instance_norm
    torch.manual_seed(5)
    norm = instance_norm(6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(3, 6, 8, 8) * 3 + 1
    stock = torch.nn.functional.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=norm.eps)
    out = norm(x.to(memory_format=torch.channels_last))
    # no NCHW copy for the next channels_last convolution to convert back
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, stock, atol=1e-5)
    assert torch.equal(norm(x), stock)  # NCHW: the stock path, bit for bit
