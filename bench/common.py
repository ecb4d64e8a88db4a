"""Pieces the benchmarks share."""

from __future__ import annotations

from typing import Any


def random_scratch_model(params: Any, corpus: list[dict], std: float) -> tuple[Any, Any]:
    """A default-shaped scratch model (char tokenizer on `corpus`) with seeded N(0, std) matrices.

    Larger-than-init weights make every row's greedy output differ, so a benchmark that compares
    outputs compares something; throughput does not depend on the values.
    """
    import torch

    from tasks.core.io import set_seed
    from tasks.core.modeling import build_scratch_model, train_tokenizer

    set_seed(0)
    tokenizer = train_tokenizer(
        [r["text"] for r in corpus] + [r["summary"] for r in corpus], kind="char", vocab_size=params.model.vocab_size
    )
    model = build_scratch_model(params.model, tokenizer)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std, generator=g)
    return model, tokenizer


def with_model_shape(params: Any, **shape: Any) -> Any:
    """`params` with some `model:` keys replaced (e.g. `hidden_size=256`), validated as a params file would be.

    For a benchmark arm on a scratch decoder of another size than the shipped one.
    """
    from tasks.core.config import Params

    data = params.model_dump()
    unknown = sorted(set(shape) - set(data["model"]))
    if unknown:
        raise ValueError(f"not model: keys: {unknown}")
    data["model"].update(shape)
    return Params.model_validate(data)
