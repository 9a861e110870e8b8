"""Bad tensors given to the model get a ValueError that names the problem and what was expected."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minivb
from tests import tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return minivb.load_model(tiny.save(tiny.build("llama", seed=9), tmp_path_factory.mktemp("m")))


@pytest.fixture
def batch(model):
    b = tiny.batch(tiny.build("llama", seed=9))
    b.pop("labels")
    return b


def check(model, batch, match, **changes):
    batch.update(changes)
    with pytest.raises(ValueError, match=match):
        model(**batch)


def test_pixel_values_of_wrong_rank(model, batch):
    check(model, batch, r"\(B, T, 3, H, W\) or \(B, 3, H, W\).*\(2, 28, 28\)", pixel_values=torch.zeros(2, 28, 28))


def test_pixel_values_with_four_channels(model, batch):
    check(model, batch, r"\(B, T, 3, H, W\)", pixel_values=torch.zeros(2, 4, 4, 28, 28))


def test_pixel_values_of_wrong_size(model, batch):
    check(model, batch, r"28", pixel_values=torch.zeros(2, 4, 3, 32, 32))


def test_pixel_values_of_integers(model, batch):
    check(model, batch, "float tensor", pixel_values=torch.zeros(2, 4, 3, 28, 28, dtype=torch.uint8))


def test_placeholder_count_differs_from_frames_times_queries(model, batch):
    # 4 frames x 4 queries = 16 placeholders in input_ids, but only 3 frames given
    check(model, batch, r"exactly T\*num_query_tokens = 12 times.*\[16, 16\]", pixel_values=batch["pixel_values"][:, :3])


def test_batch_sizes_disagree(model, batch):
    check(model, batch, "batch size 1 but pixel_values has 2", input_ids=batch["input_ids"][:1],
          attention_mask=batch["attention_mask"][:1])


def test_qformer_batch_size_disagrees(model, batch):
    check(model, batch, "qformer_input_ids has batch size 3", qformer_input_ids=torch.ones(3, 5, dtype=torch.long),
          qformer_attention_mask=torch.ones(3, 5, dtype=torch.long))


def test_token_ids_outside_vocabulary(model, batch):
    ids = batch["input_ids"].clone()
    ids[0, -1] = 5000
    check(model, batch, r"outside the vocabulary \[0, 130\).*max 5000", input_ids=ids)


def test_negative_qformer_ids(model, batch):
    ids = batch["qformer_input_ids"].clone()
    ids[1, 2] = -1
    check(model, batch, r"qformer_input_ids holds token ids outside the vocabulary \[0, 100\)", qformer_input_ids=ids)


def test_mask_of_wrong_shape(model, batch):
    check(model, batch, r"attention_mask must have the shape of its ids \(2, 22\), got \(2, 21\)",
          attention_mask=batch["attention_mask"][:, 1:])


def test_qformer_mask_of_wrong_shape(model, batch):
    check(model, batch, r"qformer_attention_mask must have the shape", qformer_attention_mask=torch.ones(2, 3))


def test_missing_input_ids(model, batch):
    check(model, batch, "input_ids is required", input_ids=None)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch_size=st.integers(0, 3), frames=st.integers(0, 3), channels=st.integers(1, 4),
       size=st.sampled_from([0, 14, 28, 29]), rank=st.sampled_from([4, 5]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64]),
       text_batch=st.integers(1, 3), placeholders=st.integers(0, 20))
def test_random_inputs_fail_only_with_value_error(model, batch_size, frames, channels, size, rank, dtype, text_batch,
                                                  placeholders):
    shape = (batch_size, frames, channels, size, size) if rank == 5 else (batch_size, channels, size, size)
    pixel_values = torch.zeros(shape, dtype=dtype)
    input_ids = torch.cat([torch.full((text_batch, placeholders), tiny.PLACEHOLDER), torch.ones(text_batch, 3,
                                                                                                dtype=torch.long)], 1)
    qformer_input_ids = torch.ones(text_batch, 4, dtype=torch.long)
    try:
        with torch.no_grad():
            out = model(pixel_values=pixel_values, qformer_input_ids=qformer_input_ids, input_ids=input_ids)
    except ValueError:
        return
    assert torch.isfinite(out.logits).all()
    assert out.logits.shape[0] == batch_size
