"""The decode engine bench/decode.py times: a static-cache decode loop over an HF Llama's modules.

Everything in a step has a fixed shape and stays on the device (positions, the LoRA token →
slot map and its metadata), so the whole step, set_batch included, is one CUDA graph.
"""

from __future__ import annotations

import contextlib
import gc
import math

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from loraplane.runtime.lora import LoraWeightBank, inject_lora
from sdpa import picked_in
from timing import capture, median_ms, verdict

PLAIN = "plain model"  # the row of the model with no LoRA layer injected


class StaticDecoder:
    def __init__(self, model: LlamaForCausalLM, batch: int, max_len: int) -> None:
        cfg = model.config
        self.model = model
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        p = next(model.parameters())
        shape = (cfg.num_hidden_layers, batch, self.kv_heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)  # [L, B, kvH, T, hd]
        self.v = torch.zeros_like(self.k)
        self.rows = torch.arange(batch, device=p.device)
        self.span = torch.arange(max_len, device=p.device)

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, shared_pos: int | None = None):
        """One token per sequence → logits [B, V]. tokens, pos: [B] int64 (where each token
        goes in its cache). shared_pos: every row's position, when they share one (the timed
        steps do): SDPA then reads keys [0, shared_pos] with no mask, which keeps the flash
        and efficient kernels eligible; a mask can send GQA decode to the slow math kernel."""
        inner = self.model.model
        b = tokens.shape[0]
        assert tokens.shape == pos.shape == (b,) and b == self.k.shape[1], (tokens.shape, pos.shape)
        h = inner.embed_tokens(tokens)[:, None, :]  # [B, 1, d]
        cos, sin = inner.rotary_emb(h, pos[:, None])
        if shared_pos is None:  # mask: [B, 1, 1, T]
            keys, mask = self.k.shape[3], (self.span[None, :] <= pos[:, None])[:, None, None, :]
        else:
            keys, mask = shared_pos + 1, None
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k[i][self.rows, :, pos] = k[:, :, 0]
            self.v[i][self.rows, :, pos] = v[:, :, 0]
            o = F.scaled_dot_product_attention(
                q, self.k[i][:, :, :keys], self.v[i][:, :, :keys], attn_mask=mask, enable_gqa=True
            )
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, 1, self.heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(inner.norm(h))[:, 0]


def sites(cfg: LlamaConfig, targets) -> list[tuple[int, int]]:
    """(d_in, d_out) of every LoRA site of the model."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    shape = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d)}
    shape |= {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    return [shape[t] for t in targets] * cfg.num_hidden_layers


def ideal_ratio(cfg, targets, n: int, rank: int) -> float:
    s = sites(cfg, targets)
    return 1 / (1 + n * rank * sum(i + o for i, o in s) / sum(i * o for i, o in s))


class Bench:
    def __init__(self, args, preset: dict, targets, device: torch.device, dtype: torch.dtype):
        self.args, self.targets, self.device, self.dtype = args, targets, device, dtype
        self.cfg = LlamaConfig(**preset, tie_word_embeddings=False)
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        with torch.device(device):
            self.model = LlamaForCausalLM(self.cfg).eval()
        torch.set_default_dtype(default)
        self.bank = inject_lora(
            self.model, targets, max_slots=max(args.ns), max_rank=args.rank, backend="triton"
        )
        self.fill_random_adapters(self.bank)
        b = args.batch
        self.decoder = StaticDecoder(self.model, b, max_len=args.context + 1)
        gen = torch.Generator(device=device).manual_seed(1)
        self.decoder.k.normal_(0, 1, generator=gen)  # a filled context; its content is irrelevant
        self.decoder.v.normal_(0, 1, generator=gen)
        self.tokens = torch.randint(0, self.cfg.vocab_size, (b,), device=device, generator=gen)
        self.pos = torch.full((b,), args.context, device=device)

    def fill_random_adapters(self, bank: LoraWeightBank) -> None:
        # Random rank-r adapters straight into every slot (bank.load copies per module,
        # which for 64 adapters x 224 sites is minutes of Python for numbers that mean nothing).
        r = self.args.rank
        with torch.no_grad():
            for layer in bank.layers.values():
                layer.lora_a.normal_(0, layer.in_features**-0.5)
                layer.lora_b.normal_(0, r**-0.5 * 0.1)
                layer.ranks.fill_(r)
                layer.scales.fill_(2.0)

    def row_slots(self, n: int) -> torch.Tensor:
        return (torch.arange(self.args.batch, device=self.device) % n).to(torch.int32)

    @torch.inference_mode()
    def check(self) -> bool:
        """The timed step is a real decode step: it matches HF's forward, eager and in a graph."""
        ok = True
        n = max(self.args.ns)
        ts = self.row_slots(n)
        ts[::3] = -1
        # 1. Our loop, token by token from an empty cache, against HF's full-sequence forward.
        seq = 6
        ids = torch.randint(0, self.cfg.vocab_size, (self.args.batch, seq), device=self.device)
        self.bank.backend = "torch"
        self.bank.set_batch(ts.repeat_interleave(seq))
        want = self.model(input_ids=ids).logits[:, -1].float()
        # In bf16, 32 random layers of differently ordered roundings put even HF's own
        # token-by-token decode a few percent from its full forward (4.7e-2 on an H200 at the
        # 8B shape), while a wrong rope, cache or LoRA row is O(1): the tolerance is twice
        # that floor, measured here, rather than a number that holds on one card only.
        self.bank.set_batch(ts)
        cache = None
        for t in range(seq):
            out = self.model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        floor = rel_err(out.logits[:, -1].float(), want)
        print(
            f"check HF token-by-token decode vs HF forward (the noise floor): rel.err {floor:.1e}"
        )
        del cache, out
        tol = 1e-4 if self.dtype == torch.float32 else max(2 * floor, 1e-2)
        dec = StaticDecoder(self.model, self.args.batch, max_len=seq)
        self.bank.backend = "triton"
        self.bank.set_batch(ts)
        for t in range(seq):
            got = dec.step(ids[:, t], torch.full_like(ids[:, t], t), shared_pos=t).float()
        ok &= report("decode loop + Triton LoRA vs HF forward + torch LoRA", got, want, tol)
        # 2. The same step from a CUDA graph (set_batch captured too), given a new adapter mix.
        static, last, pos = ts.clone(), ids[:, -1], torch.full_like(ids[:, 0], seq - 1)

        def step():
            self.bank.set_batch(static)
            return dec.step(last, pos, shared_pos=seq - 1)

        replay = capture(step, self.device)
        rolled = torch.roll(ts, 1)
        self.bank.set_batch(rolled)
        want = dec.step(last, pos, shared_pos=seq - 1).float()
        static.copy_(rolled)
        got = replay().float()
        ok &= report("graph replay, new adapter mix, vs eager", got, want, 1e-3)
        del replay
        self.bank.clear_batch()
        return ok

    def step(self) -> torch.Tensor:
        """The timed decode step: every sequence at position `context`, the cache full."""
        return self.decoder.step(self.tokens, self.pos, shared_pos=self.args.context)

    def graph_step(self, token_slots: torch.Tensor | None):
        """A captured decode step; token_slots None = LoRA off, a host tensor = host metadata."""
        if token_slots is None:
            self.bank.clear_batch()
            return capture(self.step, self.device)
        if token_slots.device.type == "cpu":
            self.bank.set_batch(token_slots)
            return capture(self.step, self.device)
        static = token_slots.clone()

        def step():
            self.bank.set_batch(static)
            return self.step()

        return capture(step, self.device)

    @contextlib.contextmanager
    def plain_model(self):
        """The model with its own Linears back and no LoRA layer anywhere, for the while."""
        swap_in(self.model, {path: layer.base for path, layer in self.bank.layers.items()})
        try:
            yield
        finally:
            swap_in(self.model, self.bank.layers)

    @torch.inference_mode()
    def attention_backend(self) -> str:
        """The SDPA kernel(s) torch runs in one eager timed step (read at dispatch)."""
        self.bank.clear_batch()
        try:
            return picked_in(self.step)
        except Exception as err:  # the decode numbers matter more than this label
            return f"unknown ({type(err).__name__}: {err})"

    @torch.inference_mode()
    def time_all(self) -> dict[str, float]:
        b, iters = self.args.batch, self.args.iters
        configs: dict[str, torch.Tensor | None] = {"lora off": None, PLAIN: None}
        configs["no adapter (host metadata)"] = torch.full((b,), -1, dtype=torch.int32)
        configs["no adapter (device metadata)"] = torch.full(
            (b,), -1, device=self.device, dtype=torch.int32
        )
        for n in self.args.ns:
            configs[f"N={n}"] = self.row_slots(n)
        results: dict[str, float] = {}
        # The references (LoRA off, the plain model) are timed first and again last, keeping
        # the faster: a ratio should not carry the first run's warm-up or a clock drift.
        for name, token_slots in [*configs.items(), ("lora off", None), (PLAIN, None)]:
            with self.plain_model() if name == PLAIN else contextlib.nullcontext():
                run = self.graph_step(token_slots)
                t = median_ms(run, self.device, iters)
            results[name] = min(t, results.get(name, t))
            del run
        self.bank.clear_batch()
        return results

    @torch.inference_mode()
    def time_peft(self) -> dict[str, float]:
        from peft import LoraConfig, get_peft_model
        from transformers import DynamicCache

        # Put the plain Linears back and free our slots: PEFT wraps the very same base.
        swap_in(self.model, {path: layer.base for path, layer in self.bank.layers.items()})
        del self.bank, self.decoder
        gc.collect()  # the layers and LoraWeightBank reference each other
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        n, r = self.args.peft_n, self.args.rank
        config = LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=list(self.targets), init_lora_weights=False
        )
        with torch.device(self.device):
            peft = get_peft_model(self.model, config, adapter_name="a0")
            for i in range(1, n):
                peft.add_adapter(f"a{i}", config)
        peft.to(self.dtype).eval()
        names = [f"a{i % n}" for i in range(self.args.batch)]
        ctx = self.args.context
        ids = torch.randint(0, self.cfg.vocab_size, (self.args.batch, ctx + 1), device=self.device)
        cache = DynamicCache(config=self.cfg)
        peft(input_ids=ids[:, :ctx], past_key_values=cache, use_cache=True, adapter_names=names)

        def step():
            peft(input_ids=ids[:, ctx:], past_key_values=cache, use_cache=True, adapter_names=names)
            cache.crop(-1)  # drop the token just added: every step sees the same context

        return {f"peft N={n}": median_ms(step, self.device, max(3, self.args.iters // 4), warmup=1)}

    def report(self, ms: dict[str, float]) -> None:
        cpu, b = self.device.type == "cpu", self.args.batch
        off, plain = ms["lora off"], ms[PLAIN]
        print(
            f"\n{'configuration':<30} {'ms/step':>9} {'tok/s':>10} {'vs off':>7} "
            f"{'vs plain':>8} {'ideal':>7}"
        )
        for name, t in ms.items():
            ideal = ""
            if name.startswith("N="):
                ideal = f"{ideal_ratio(self.cfg, self.targets, int(name[2:]), self.args.rank):.3f}"
            print(
                f"{name:<30} {t:>9.3f} {b / t * 1e3:>10.0f} {off / t:>7.3f} {plain / t:>8.3f} "
                f"{ideal:>7}"
            )
        nmax = max(self.args.ns)
        targets = []
        if f"N={nmax}" in ms:
            ratio, ideal = (
                off / ms[f"N={nmax}"],
                ideal_ratio(self.cfg, self.targets, nmax, self.args.rank),
            )
            targets.append(
                (f"{nmax} distinct rank-{self.args.rank}: >= 0.70 of base", ratio >= 0.70)
            )
            targets.append((f"{nmax} distinct: >= 0.90 of ideal {ideal:.3f}", ratio >= 0.9 * ideal))
        if "N=1" in ms:
            targets.append(("1 adapter shared by the batch: >= 0.90", off / ms["N=1"] >= 0.90))
        none = ms["no adapter (host metadata)"]
        targets.append(("no adapter: >= 0.98 of lora off", off / none >= 0.98))
        targets.append(
            ("no adapter: >= 0.98 of the plain model (no LoRA layers)", plain / none >= 0.98)
        )
        peft_key = f"peft N={self.args.peft_n}"
        if peft_key in ms and f"N={self.args.peft_n}" in ms:
            speedup = ms[peft_key] / ms[f"N={self.args.peft_n}"]
            targets.append(
                (f">= 10x PEFT at N={self.args.peft_n} (got {speedup:.2f}x)", speedup >= 10)
            )
        print()
        for what, ok in targets:
            print(f"target {what:<55} {verdict(ok, cpu)}")


def swap_in(model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> None:
    """Put each module at its path in model (path → module), replacing what is there."""
    for path, module in modules.items():
        parent, short = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), short, module)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def report(what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    err = rel_err(got, want)
    good = math.isfinite(err) and err < tol
    print(f"check {what}: rel.err {err:.1e} (tolerance {tol:.0e})  {'ok' if good else 'WRONG'}")
    return good
