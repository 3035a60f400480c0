"""Students: a smaller architecture cut from the teacher (as Minitron does), then trained to imitate it.

Depth is cut by dropping the decoder blocks that change their input least on calibration data (block
influence, 1 − cos(input, output)); width by removing the MLP channels, attention heads (whole key/value
groups first, then query heads within the kept groups) and hidden channels of lowest activation importance.
Weights are copied from the teacher, and the student is a standard config of the teacher's family, so plain
transformers loads it. Supported: decoder blocks in the Llama layout (`self_attn.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`), which Llama, Mistral, Qwen2 and
SmolLM share.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from autocompress.models import decoder_blocks, student_config
from autocompress.models import head_dim as head_size
from autocompress.plan import StudentArchitecture


@dataclass(frozen=True)
class Importance:
    """Calibration measurements that decide what a student keeps."""

    blocks: torch.Tensor  # [layers]: 1 − mean cos(block input, block output)
    mlp_channels: torch.Tensor  # [layers, intermediate]: mean |act(gate) · up|
    heads: torch.Tensor  # [layers, heads]: mean L2 norm of each head's attention output
    hidden: torch.Tensor  # [hidden]: mean |input of every block norm| summed over blocks


def _blocks(model: nn.Module) -> nn.ModuleList:
    return decoder_blocks(model)[1]


@torch.no_grad()
def measure_importance(model: PreTrainedModel, tokens: torch.Tensor, batch_size: int = 4) -> Importance:
    config = model.config
    blocks = _blocks(model)
    n_layers, head_dim = len(blocks), head_size(config)
    sums = {
        "blocks": torch.zeros(n_layers),
        "mlp": torch.zeros(n_layers, config.intermediate_size),
        "heads": torch.zeros(n_layers, config.num_attention_heads),
        "hidden": torch.zeros(config.hidden_size),
    }
    counts = {"tokens": 0}
    hooks = []

    def block_hook(index: int):
        def hook(_module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cosine = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            sums["blocks"][index] += (1 - cosine).sum().cpu()
            sums["hidden"] += hidden_in.float().abs().sum(dim=(0, 1)).cpu()

        return hook

    def down_input_hook(index: int):
        def hook(_module, inputs):
            sums["mlp"][index] += inputs[0].float().abs().sum(dim=(0, 1)).cpu()

        return hook

    def o_input_hook(index: int):
        def hook(_module, inputs):
            per_head = inputs[0].float().unflatten(-1, (-1, head_dim)).norm(dim=-1)
            sums["heads"][index] += per_head.sum(dim=(0, 1)).cpu()

        return hook

    for index, block in enumerate(blocks):
        hooks.append(block.register_forward_hook(block_hook(index), with_kwargs=True))
        hooks.append(block.mlp.down_proj.register_forward_pre_hook(down_input_hook(index)))
        hooks.append(block.self_attn.o_proj.register_forward_pre_hook(o_input_hook(index)))
    device = next(model.parameters()).device
    try:
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start : start + batch_size]
            model(batch.to(device), use_cache=False)
            counts["tokens"] += batch.numel()
    finally:
        for hook in hooks:
            hook.remove()
    n = counts["tokens"]
    return Importance(sums["blocks"] / n, sums["mlp"] / n, sums["heads"] / n, sums["hidden"] / n)


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, in their original order."""
    return scores.topk(count).indices.sort().values


def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> None:
    weight = linear.weight.data
    if rows is not None:
        weight = weight[rows]
        if linear.bias is not None:
            linear.bias.data = linear.bias.data[rows].clone()
    if columns is not None:
        weight = weight[:, columns]
    linear.weight.data = weight.clone()
    linear.out_features, linear.in_features = weight.shape


def _kept_heads(scores: torch.Tensor, kv_heads: int, group_size: int, teacher_group: int) -> tuple[list, list]:
    """Key/value groups by total importance, then query heads within each kept group."""
    grouped = scores.reshape(-1, teacher_group)
    groups = _top(grouped.sum(-1), kv_heads)
    query_heads = [
        int(group) * teacher_group + int(head) for group in groups for head in _top(grouped[group], group_size)
    ]
    return groups.tolist(), query_heads


def _rows_of_heads(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(head * head_dim, (head + 1) * head_dim) for head in heads])


@torch.no_grad()
def build_student(
    teacher: PreTrainedModel, architecture: StudentArchitecture, importance: Importance
) -> PreTrainedModel:
    """A student cut from a copy of the teacher's weights; the teacher is left untouched."""
    config = teacher.config
    shape = architecture.resolved(config)
    head_dim = head_size(config)
    teacher_group = config.num_attention_heads // (
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    )
    student = copy.deepcopy(teacher)
    blocks_name, blocks = decoder_blocks(student)
    kept_blocks = _top(importance.blocks, shape["num_layers"]).tolist()
    hidden = _top(importance.hidden, shape["hidden_size"]) if shape["hidden_size"] < config.hidden_size else None
    new_blocks = []
    for index in kept_blocks:
        block = blocks[index]
        attention, mlp = block.self_attn, block.mlp
        if shape["intermediate_size"] < config.intermediate_size:
            channels = _top(importance.mlp_channels[index], shape["intermediate_size"])
            _slice_linear(mlp.gate_proj, rows=channels)
            _slice_linear(mlp.up_proj, rows=channels)
            _slice_linear(mlp.down_proj, columns=channels)
        if shape["num_attention_heads"] < config.num_attention_heads:
            groups, heads = _kept_heads(
                importance.heads[index],
                shape["num_key_value_heads"],
                shape["num_attention_heads"] // shape["num_key_value_heads"],
                teacher_group,
            )
            _slice_linear(attention.q_proj, rows=_rows_of_heads(heads, head_dim))
            _slice_linear(attention.k_proj, rows=_rows_of_heads(groups, head_dim))
            _slice_linear(attention.v_proj, rows=_rows_of_heads(groups, head_dim))
            _slice_linear(attention.o_proj, columns=_rows_of_heads(heads, head_dim))
        if hidden is not None:
            for linear in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
                _slice_linear(linear, columns=hidden)
            _slice_linear(attention.o_proj, rows=hidden)
            _slice_linear(mlp.down_proj, rows=hidden)
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight.data = norm.weight.data[hidden].clone()
        new_blocks.append(block)
    parent_name, _, attribute = blocks_name.rpartition(".")
    setattr(student.get_submodule(parent_name), attribute, nn.ModuleList(new_blocks))
    if hidden is not None:
        embedding = student.get_input_embeddings()
        embedding.weight.data = embedding.weight.data[:, hidden].clone()
        embedding.embedding_dim = len(hidden)
        final_norm = student.model.norm
        final_norm.weight.data = final_norm.weight.data[hidden].clone()
        if not config.tie_word_embeddings:
            _slice_linear(student.get_output_embeddings(), columns=hidden)
    # A fresh model of the student config proves plain transformers can build it; the cut weights fill it.
    fresh = AutoModelForCausalLM.from_config(student_config(config, shape), dtype=next(teacher.parameters()).dtype)
    fresh.load_state_dict(student.state_dict(), strict=True)
    if config.tie_word_embeddings:
        fresh.tie_weights()
    return fresh.to(next(teacher.parameters()).device).eval()


@dataclass(frozen=True)
class DistillationOptions:
    steps: int = 200
    optimizer: str = "adamw"  # adamw | sgd
    learning_rate: float = 1e-4
    batch_size: int = 4
    temperature: float = 1.0
    hidden_weight: float = 0.0  # weight of the final hidden-state MSE (only when hidden sizes match)
    # Weight of the next-token cross-entropy added to the KL (Hinton et al.'s hard-label term). The search's
    # loss is the KL alone, which pure KD lowers most; the labels lower held-out perplexity on in-domain text.
    ce_weight: float = 0.0
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False
    eval_every: int = 50
    bf16: bool | None = None  # bfloat16 autocast; None: where it pays (CUDA)
    seed: int = 0  # of the order training windows are drawn in
    loss: str = "kd"  # kd: imitate the teacher; ce: plain next-token cross-entropy (the baseline KD must beat)


def _optimizer(name: str, parameters, options: DistillationOptions) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=options.learning_rate, weight_decay=options.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=options.learning_rate, weight_decay=options.weight_decay, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; known: adamw, sgd")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) per token at a temperature, scaled by T² as Hinton et al. do."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(
        student_log_probs.flatten(0, 1), teacher_log_probs.flatten(0, 1), log_target=True, reduction="batchmean"
    )
    return kl * temperature**2


@torch.no_grad()
def evaluate_kd(student: nn.Module, teacher: nn.Module, tokens: torch.Tensor, batch_size: int) -> float:
    """Mean per-token KL(teacher ‖ student) at temperature 1 on `tokens`."""
    device = next(student.parameters()).device
    total = 0.0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size].to(device)
        loss = kd_loss(student(batch, use_cache=False).logits, teacher(batch, use_cache=False).logits, 1.0)
        total += loss.item() * batch.numel()
    return total / tokens.numel()


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def _training_loss(
    student: nn.Module, teacher: nn.Module, batch: torch.Tensor, options: DistillationOptions, autocast
) -> torch.Tensor:
    """The loss of one batch: KL to the teacher at the temperature (plus the hidden-state MSE and the weighted
    cross-entropy), or plain CE."""
    if options.loss == "ce":
        with autocast:
            logits = student(batch, use_cache=False).logits
        return next_token_ce(logits, batch)
    with_hidden = options.hidden_weight > 0
    with torch.no_grad():
        teacher_out = teacher(batch, use_cache=False, output_hidden_states=with_hidden)
    with autocast:
        student_out = student(batch, use_cache=False, output_hidden_states=with_hidden)
    loss = kd_loss(student_out.logits, teacher_out.logits, options.temperature)
    if options.ce_weight > 0:
        loss = loss + options.ce_weight * next_token_ce(student_out.logits, batch)
    if with_hidden and student_out.hidden_states[-1].shape == teacher_out.hidden_states[-1].shape:
        loss = loss + options.hidden_weight * F.mse_loss(
            student_out.hidden_states[-1].float(), teacher_out.hidden_states[-1].float()
        )
    return loss


def distill(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    train_tokens: torch.Tensor,
    options: DistillationOptions,
    eval_tokens: torch.Tensor | None = None,
    on_eval: Callable[[int, float], bool] | None = None,
    progress: bool = False,
    frozen_masks: dict[str, torch.Tensor] | None = None,
) -> list[tuple[int, float]]:
    """Train `student` to imitate `teacher` on `train_tokens`; return the (step, eval KL) history.

    Every `eval_every` steps the KL on `eval_tokens` is measured and passed to `on_eval`, which returns
    True to stop early (an Optuna pruner's verdict). `frozen_masks` keeps pruned weights at zero.
    """
    device = next(student.parameters()).device
    teacher.eval()
    student.train()
    if options.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    optimizer = _optimizer(options.optimizer, student.parameters(), options)
    bf16 = device.type == "cuda" if options.bf16 is None else options.bf16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    generator = torch.Generator().manual_seed(options.seed)
    history: list[tuple[int, float]] = []
    parameters = dict(student.named_parameters())
    try:
        for step in tqdm(range(1, options.steps + 1), desc="distillation", disable=not progress, leave=False):
            rows = torch.randint(len(train_tokens), (options.batch_size,), generator=generator)
            batch = train_tokens[rows].to(device)
            loss = _training_loss(student, teacher, batch, options, autocast)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"distillation loss is not finite at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if frozen_masks:
                with torch.no_grad():
                    for name, mask in frozen_masks.items():
                        parameters[name].mul_(mask)
            if eval_tokens is not None and (step % options.eval_every == 0 or step == options.steps):
                student.eval()
                kl = evaluate_kd(student, teacher, eval_tokens, options.batch_size)
                student.train()
                history.append((step, kl))
                if on_eval is not None and on_eval(step, kl):
                    break
    finally:
        student.eval()
        if options.gradient_checkpointing:
            student.gradient_checkpointing_disable()
    return history
