r"""``hbmeta bench step``: time and backward memory of one meta-iteration versus inner steps.

Every algorithm (GEM-BML+ with Gauss-Newton VI, GEM-BML+ with SVI, MAML, FOMAML, Reptile, ABML) meta-trains the
sinusoid net (:func:`hbmeta.models.functional.mlp`, 2 x 40 ReLU) on meta-batches of sinusoid tasks (K=10 support, 10
query) at several inner-step counts, and GEM-BML+ and MAML also at their own default counts (2 Gauss-Newton steps,
5 SGD steps), in ONE run: each repetition times every (algorithm, steps) pair once, in a rotated order, on the
same task batch, so machine noise hits all alike. Reported per pair:

- **ms/iter**: median wall time (``time.perf_counter``, CUDA synchronised) of ``MetaLearner.meta_step(metrics=False)``
  (the meta-update without the logging numbers that only posterior algorithms compute; the training loop asks for
  them only on the iterations it logs)
  over ``repeats`` repetitions after ``warmup`` untimed ones;
- **saved MiB**: the *peak of live saved-for-backward bytes* during one meta-step, measured in a separate,
  untimed meta-step with :func:`hbmeta.models.saved_tensors.peak_saved_bytes` (saved-tensor hooks). The pack hook records the
  saved tensor's storage (``untyped_storage().nbytes()``, deduplicated by ``data_ptr`` with a reference
  count) and returns a small holder whose :func:`weakref.finalize` releases the count when autograd frees
  the saved tensor (after ``backward`` without ``retain_graph``, or when the graph is dropped). The
  maximum over the meta-step of the live sum is the memory the graphs held *at once*: it stays flat in the
  inner steps when each step's graph is freed before the next (SVI GEM, FOMAML, Reptile), is zero for
  Gauss-Newton VI (no autograd graph at all: closed-form Jacobians under ``no_grad``) and grows linearly when
  the inner loop is unrolled (MAML, ABML). Parameters saved by a graph count too; optimizer state and other
  non-saved tensors do not.

The lower bound is the SVI GEM-BML+ meta-step written in plain torch (:class:`TorchGemPlus`): no Pyro, same
math, same SGD inner optimiser, so ``hbmeta svi / lower bound`` is the price of the library's layers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.inner import InnerConfig
from hbmeta.inference.learner import MetaLearner, default_inner
from hbmeta.models.functional import mlp
from hbmeta.models.likelihoods import GaussianLikelihood
from hbmeta.models.saved_tensors import peak_saved_bytes
from hbmeta.tasks.sinusoid import SinusoidTasks

__all__ = ["rotated_timings", "StepBenchConfig", "TorchGemPlus", "peak_saved_bytes", "run_step_benchmark", "format_step_table",
           "write_step_benchmark", "LOWER_BOUND", "PYRO_TRACED", "SVI"]

LOWER_BOUND = "torch gem-bml+ svi (lower bound)"
#: GEM-BML+ with the SVI inner update (whitened SGD, reparameterised samples as in the lower bound) instead of Gauss-Newton VI
SVI = "gem-bml+ (svi)"
#: GEM-BML+ SVI with the ELBO traced by Pyro every inner step (``InnerConfig(elbo="pyro")``) instead of the fast path
PYRO_TRACED = "gem-bml+ (svi, pyro-traced elbo)"


@dataclass
class StepBenchConfig:
    """Settings of the step benchmark (sinusoid, K=10 support / 10 query, Gaussian noise 0.5)."""

    steps: tuple[int, ...] = (1, 5, 10, 20)
    meta_batch: int = 25
    repeats: int = 5
    warmup: int = 1
    device: str = "cpu"
    seed: int = 0
    algorithms: tuple[str, ...] = ("gem-bml+", SVI, PYRO_TRACED, "maml", "fomaml", "reptile", "abml", "ibaml")
    noise_scale: float = 0.5
    lower_bound: bool = True
    #: also time every algorithm at its own default number of inner steps (Gauss-Newton GEM-BML+: 2, MAML: 5)
    defaults: bool = True
    #: torch intra-op threads during the run (restored after); the tensors are small and on a shared
    #: machine spinning OpenMP workers make 2+ threads erratic (10-100x outliers). ``None``: torch's default.
    threads: int | None = 1


class TorchGemPlus:
    """GEM-BML+ (sequential, SVI) meta-step in plain torch: the reference a library cannot beat.

    The same math as hbmeta's SVI GEM-BML+ with the plain reparameterisation estimator: whitened mean-field guide ``theta = m_ref + s_ref (z + e^rho eps)``
    against the prior in use, analytic KL, summed Gaussian log-likelihood, ``S`` Monte-Carlo samples, SGD with
    per-task gradient clipping; ``q1`` = VI from the prior on D_tr, ``q2`` = VI from q1 with prior q1 on D_val;
    then the closed form ``d mu = (m2 - m1)/sigma^2``, ``d log sigma = (s2^2 + (m2-mu)^2 - s1^2 - (m1-mu)^2)/sigma^2``
    averaged over tasks, handed to an Adam meta-optimiser (as :class:`MetaLearner` does). Additive constants
    of the ELBO are left out (they change no gradient).
    """

    def __init__(self, net: nn.Sequential, inner: InnerConfig, noise_scale: float, prior_scale: float = 0.02,
                 meta_lr: float = 1e-3, device: str = "cpu"):
        self.linears = [(m.out_features, m.in_features) for m in net if isinstance(m, nn.Linear)]
        loc = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).to(device)
        self.mu = nn.Parameter(loc)
        self.log_sigma = nn.Parameter(torch.full_like(loc, math.log(prior_scale)))
        self.inner, self.noise = inner, noise_scale
        self.meta_opt = torch.optim.Adam([self.mu, self.log_sigma], lr=meta_lr)

    def forward(self, theta: Tensor, x: Tensor) -> Tensor:
        """``theta [S, T, P]``, ``x [T, N, in]`` -> ``[S, T, N, out]`` with batched matmuls."""
        h, i = x, 0
        for j, (o, n) in enumerate(self.linears):
            w = theta[..., i:i + o * n].unflatten(-1, (o, n))
            b = theta[..., i + o * n:i + o * n + o]
            i += o * n + o
            h = torch.matmul(h, w.transpose(-1, -2)) + b.unsqueeze(-2)
            if j < len(self.linears) - 1:
                h = torch.relu(h)
        return h

    def vi(self, x: Tensor, y: Tensor, loc0: Tensor, scale0: Tensor, ref_loc: Tensor, ref_scale: Tensor,
           generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``steps`` SGD steps on the summed negative ELBO of all tasks; returns detached ``(m, s)``."""
        cfg = self.inner
        z = ((loc0 - ref_loc) / ref_scale).requires_grad_()
        rho = (scale0.log() - ref_scale.log()).requires_grad_()
        opt = torch.optim.SGD([z, rho], lr=cfg.lr)
        for _ in range(cfg.steps):
            eps = torch.randn((cfg.num_samples, *z.shape), generator=generator, device=z.device)
            theta = ref_loc + ref_scale * (z + rho.exp() * eps)
            nll = 0.5 * ((self.forward(theta, x) - y) / self.noise).pow(2).sum() / cfg.num_samples
            kl = (-rho + 0.5 * (torch.exp(2 * rho) + z.pow(2)) - 0.5).sum()
            opt.zero_grad(set_to_none=True)
            (nll + kl).backward()
            if cfg.clip_norm is not None:
                norm = torch.sqrt(z.grad.pow(2).sum(1) + rho.grad.pow(2).sum(1))
                factor = (cfg.clip_norm / (norm + 1e-12)).clamp(max=1.0).unsqueeze(1)
                z.grad.mul_(factor)
                rho.grad.mul_(factor)
            opt.step()
        return (ref_loc + ref_scale * z).detach(), (ref_scale * rho.exp()).detach()

    def meta_step(self, batch: TaskBatch, generator: torch.Generator | None = None) -> None:
        mu, sigma = self.mu.detach(), self.log_sigma.detach().exp()
        shape = (batch.num_tasks, mu.numel())
        mu_t, sigma_t = mu.expand(shape), sigma.expand(shape)
        m1, s1 = self.vi(batch.x_train, batch.y_train, mu_t, sigma_t, mu_t, sigma_t, generator)
        m2, s2 = self.vi(batch.x_val, batch.y_val, m1, s1, m1, s1, generator)
        var = sigma.pow(2)
        self.meta_opt.zero_grad(set_to_none=True)
        self.mu.grad = -((m2 - m1) / var).mean(0)
        self.log_sigma.grad = -((s2.pow(2) + (m2 - mu).pow(2) - s1.pow(2) - (m1 - mu).pow(2)) / var).mean(0)
        self.meta_opt.step()


def _runner(name: str, steps: int | None, config: StepBenchConfig):
    """A ``meta_step(batch, generator)`` callable for one (algorithm, steps) pair, with fresh state.

    Every algorithm runs with hbmeta's defaults for its family (:func:`hbmeta.inference.learner.default_inner`)
    at ``steps`` inner steps (``None``: its default number); the SVI rows and the lower bound run GEM-BML+'s SVI
    defaults with plain reparameterised samples, as the lower bound draws them (the SVI default, local
    reparameterisation, computes a second, variance forward pass per layer), so the ratio compares like with like.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = mlp()
    algorithm = "gem-bml+" if name in (LOWER_BOUND, PYRO_TRACED, SVI) else name
    default = default_inner(algorithm, gauss_newton=name not in (LOWER_BOUND, PYRO_TRACED, SVI))
    inner = dataclasses.replace(default, steps=default.steps if steps is None else steps,
                                elbo="pyro" if name == PYRO_TRACED else "auto",
                                estimator="reparam" if name in (LOWER_BOUND, PYRO_TRACED, SVI) else default.estimator)
    if name == LOWER_BOUND:
        return TorchGemPlus(net, inner, config.noise_scale, device=config.device).meta_step
    learner = MetaLearner(net, GaussianLikelihood(config.noise_scale), algorithm=algorithm, inner=inner).to(config.device)
    return functools.partial(learner.meta_step, metrics=False)  # as the training loop between its log lines


def run_step_benchmark(config: StepBenchConfig | None = None) -> dict:
    """Run the benchmark; returns a JSON-ready dict (``rows``, ``lower_bound_ratio``, ``targets``, ``env``)."""
    config = StepBenchConfig() if config is None else config
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(config)
    finally:
        torch.set_num_threads(threads)


def rotated_timings(runners: dict, batch_for, noise_gen: torch.Generator, warmup: int, repeats: int, sync,
                    report=None) -> dict:
    """Seconds of each runner per repetition, every runner once per repetition in a rotated order on the same
    batch (``batch_for(rep)``), so machine noise hits all alike; the first ``warmup`` repetitions are not kept.
    ``report(rep, key, seconds)``, if given, hears of every call."""
    keys = list(runners)
    times: dict = {k: [] for k in keys}
    for rep in range(warmup + repeats):
        batch = batch_for(rep)
        shift = rep % len(keys)
        for key in keys[shift:] + keys[:shift]:  # rotate so no runner always runs first or last
            sync()
            start = time.perf_counter()
            runners[key](batch, noise_gen)
            sync()
            seconds = time.perf_counter() - start
            if rep >= warmup:
                times[key].append(seconds)
            if report is not None:
                report(rep, key, seconds)
    return times


def _run(config: StepBenchConfig) -> dict:
    names = list(config.algorithms) + ([LOWER_BOUND] if config.lower_bound else [])
    sync = torch.cuda.synchronize if config.device.startswith("cuda") else (lambda: None)
    pairs = [(n, k) for k in config.steps for n in names]
    if config.defaults:  # each at its own default number of inner steps (``steps`` None)
        pairs += [(n, None) for n in ("gem-bml+", "maml") if n in names]
    runners = {p: _runner(*p, config) for p in pairs}
    tasks, data_gen = SinusoidTasks(), torch.Generator().manual_seed(config.seed)
    noise_gen = torch.Generator(device=config.device).manual_seed(config.seed + 1)
    times = rotated_timings(runners, lambda rep: tasks.sample(config.meta_batch, data_gen).to(config.device), noise_gen,
                            config.warmup, config.repeats, sync)
    batch = tasks.sample(config.meta_batch, data_gen).to(config.device)
    rows = []
    for name, k in pairs:
        saved = peak_saved_bytes(runners[(name, k)], batch, noise_gen)
        steps = k if k is not None else _default_steps(name)
        rows.append({"algorithm": name, "steps": steps, "default_steps": k is None,
                     "ms_per_iter": 1e3 * statistics.median(times[(name, k)]),
                     "ms_all": [1e3 * t for t in times[(name, k)]], "saved_bytes": saved, "saved_mib": saved / 2**20})
    result = {"config": asdict(config), "rows": rows,
              "env": {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
                      "device": config.device, "machine": platform.machine()}}
    result["lower_bound_ratio"] = {str(k): _get(rows, SVI, k, "ms_per_iter") / _get(rows, LOWER_BOUND, k, "ms_per_iter")
                                   for k in config.steps if {SVI, LOWER_BOUND} <= set(names)}
    result["pyro_traced_ratio"] = {str(k): _get(rows, PYRO_TRACED, k, "ms_per_iter") / _get(rows, LOWER_BOUND, k, "ms_per_iter")
                                   for k in config.steps if {PYRO_TRACED, LOWER_BOUND} <= set(names)}
    result["targets"] = _targets(rows, config, result["lower_bound_ratio"])
    return result


def _default_steps(name: str) -> int:
    return default_inner(name).steps


def _get(rows: list[dict], name: str, steps: int, key: str, defaults: bool = False) -> float:
    return next(r[key] for r in rows if r["algorithm"] == name and r["steps"] == steps
                and r.get("default_steps", False) == defaults)


def _targets(rows: list[dict], config: StepBenchConfig, ratio: dict[str, float]) -> dict[str, dict]:
    """The issue's four targets, each ``{"met": bool | None, "detail": str}`` (``None``: not measured)."""
    names, ks = {r["algorithm"] for r in rows}, sorted(config.steps)
    out: dict[str, dict] = {}
    if "gem-bml+" in names and len(ks) > 1:
        mem = [_get(rows, n, k, "saved_bytes") for n in ("gem-bml+", SVI) if n in names for k in ks]
        out["gem_memory_flat"] = {"met": all(max(mem[i:i + len(ks)]) <= 1.05 * min(mem[i:i + len(ks)])
                                             for i in range(0, len(mem), len(ks))),
                                  "detail": f"saved bytes (Gauss-Newton, SVI) {mem} at steps {ks}"}
    if "maml" in names and len(ks) > 2:
        mem = [_get(rows, "maml", k, "saved_bytes") for k in ks]
        slope = (mem[-1] - mem[0]) / (ks[-1] - ks[0])
        dev = max(abs(m - (mem[0] + slope * (k - ks[0]))) for m, k in zip(mem, ks))
        out["maml_memory_linear"] = {"met": slope > 0 and dev <= 0.05 * (mem[-1] - mem[0]),
                                     "detail": f"{slope / 2**20:.3f} MiB per inner step; max deviation from the line {dev / 2**20:.3f} MiB"}
    if {"gem-bml+", "maml"} <= names and 5 in ks:
        r = _get(rows, "gem-bml+", 5, "ms_per_iter") / _get(rows, "maml", 5, "ms_per_iter")
        out["gem_time_within_1.5x_maml_at_5"] = {"met": r <= 1.5,
                                                 "detail": f"GEM-BML+ / MAML time at 5 inner steps each = {r:.2f} (target <= 1.5)"}
    if {"gem-bml+", "maml"} <= names and config.defaults:
        g, m = _default_steps("gem-bml+"), _default_steps("maml")
        r = _get(rows, "gem-bml+", g, "ms_per_iter", True) / _get(rows, "maml", m, "ms_per_iter", True)
        out["gem_time_within_1.5x_maml_at_defaults"] = {
            "met": r <= 1.5, "detail": f"GEM-BML+ ({g} Gauss-Newton steps) / MAML ({m} SGD steps) time = {r:.2f} (target <= 1.5)"}
    if ratio:
        out["hbmeta_within_1.3x_lower_bound"] = {
            "met": max(ratio.values()) <= 1.3,
            "detail": "hbmeta / pure torch: " + ", ".join(f"{k} steps {v:.2f}x" for k, v in ratio.items()) + " (target <= 1.3)"}
    return out


def format_step_table(result: dict) -> str:
    """A Markdown table (algorithm x steps: ms/iter, saved MiB, ratio to the lower bound) and the targets."""
    ratio = result.get("lower_bound_ratio", {})
    lines = ["| algorithm | inner steps | ms / meta-iter (median) | saved for backward (MiB, peak) | hbmeta / lower bound |",
             "|---|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["algorithm"] for r in result["rows"]):
        for r in (r for r in result["rows"] if r["algorithm"] == name):
            table = {SVI: ratio, PYRO_TRACED: result.get("pyro_traced_ratio", {})}.get(name, {})
            rel = f"{table[str(r['steps'])]:.2f}x" if str(r["steps"]) in table and not r.get("default_steps") else ""
            steps = f"{r['steps']} (default)" if r.get("default_steps") else str(r["steps"])
            lines.append(f"| {name} | {steps} | {r['ms_per_iter']:.1f} | {r['saved_mib']:.3f} | {rel} |")
    env = result["env"]
    lines.append(f"\nmeta-batch {result['config']['meta_batch']}, median of {result['config']['repeats']} "
                 f"(after {result['config']['warmup']} warm-up), {env['device']}, {env['threads']} threads, torch {env['torch']}")
    for key, t in result.get("targets", {}).items():
        mark = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"- target `{key}`: **{mark}** ({t['detail']})")
    return "\n".join(lines)


def write_step_benchmark(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``step_benchmark.json``, ``step_benchmark.md`` and ``step_benchmark.png`` (time and memory vs steps)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "step_benchmark.json", "markdown": out / "step_benchmark.md", "png": out / "step_benchmark.png"}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["markdown"].write_text(format_step_table(result) + "\n")
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_time, ax_mem = fig.subplots(1, 2)
    for name in dict.fromkeys(r["algorithm"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["algorithm"] == name and not r.get("default_steps")]
        style = "--" if name == LOWER_BOUND else "-"
        ks = [r["steps"] for r in rows]
        ax_time.plot(ks, [r["ms_per_iter"] for r in rows], style, marker="o", label=name)
        ax_mem.plot(ks, [r["saved_mib"] for r in rows], style, marker="o", label=name)
    ax_time.set(xlabel="inner steps", ylabel="ms per meta-iteration", title="time")
    ax_mem.set(xlabel="inner steps", ylabel="MiB saved for backward (peak)", title="memory")
    ax_time.legend(fontsize=8)
    fig.savefig(paths["png"], dpi=120)
    return paths
