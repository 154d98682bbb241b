"""Indexer top-k picks on the engine path equal the full forward's picks (2 index heads, top-2).

With two index heads many scores are exactly 0 after the ReLU, so ties are common; they must
be broken the same way whatever the chunk a query arrives in.
"""

import torch

from dsv4.config import load_preset
from dsv4.engine.runner import ModelRunner, RunItem
from dsv4.model.indexer import select_topk
from support.engine_helpers import random_model

LENGTH = 200
CHUNK_SIZES = (1, 2, 3, 5, 7, 11, 13, 1, 1, 4)


def record_selections(model, log):
    """Hook every indexer; log[(layer, position)] = selected entries of that query."""
    handles = []
    for index, layer in enumerate(model.layers):
        if layer.attn.indexer is None:
            continue

        def hook(module, args, output, index=index):
            start = args[4]
            for row, picked in enumerate(output):
                log[(index, start + row)] = picked[picked >= 0].tolist()  # -1 pads rows

        handles.append(layer.attn.indexer.register_forward_hook(hook))
    return handles


def test_chunked_selections_equal_full_forward():
    config = load_preset("test-mix").replace(index_n_heads=2, index_topk=2)
    model = random_model(config, "plain", seed=3)
    ids = torch.randint(0, config.vocab_size, (LENGTH,), generator=torch.Generator().manual_seed(8)).tolist()
    full, chunked = {}, {}

    handles = record_selections(model, full)
    model.forward(torch.tensor([ids]))
    for handle in handles:
        handle.remove()

    handles = record_selections(model, chunked)
    runner = ModelRunner(model)
    state = runner.new_state(LENGTH)
    start, turn = 0, 0
    while start < LENGTH:
        size = min(CHUNK_SIZES[turn % len(CHUNK_SIZES)], LENGTH - start)
        runner.run([RunItem(state, ids[start: start + size], start, size)])
        start, turn = start + size, turn + 1
    for handle in handles:
        handle.remove()

    assert full.keys() == chunked.keys()
    for key in full:
        assert full[key] == chunked[key], f"(layer, position) {key}"
    assert any(len(picked) == 2 for picked in full.values())


def test_equal_scores_pick_lower_index():
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    visible = torch.tensor([4, 4, 2])
    assert select_topk(scores, visible, 2).tolist() == [[0, 1], [1, 3], [0, 1]]
