"""Generation: from the model's next-token logits to an answer, one token at a time, written out by hand.

Where it sits: model.py turns frames and a prompt into the language model's input embeddings; this file runs the
language model over them once (`prefill`), then once per new token (`decode_one_token`) with the KV cache of
llama.py / t5.py, and picks each next token by one of three rules:
    greedy        the argmax of the processed logits
    sampling      a draw from softmax(processed logits), after temperature, top-k and top-p
    beam search   keep the num_beams most probable partial answers (summed log-probabilities)

The semantics are those of transformers 5.24's `generate` for the same arguments (tests/test_generate.py checks
it token for token); each convention users trip over is named in a one-line comment where it is handled.

Letters: B batch, K beams (num_beams), R rows decoded together (B, B * num_return_sequences or B * K),
L prompt length (input_ids with its placeholders for LLaMA; the T5 decoder's "prompt" is its start token),
S keys in the cache, D hidden size, V vocabulary.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import compiling
from .llama import KVCache
from .model import check_arguments, check_context, special_token
from .t5 import T5Cache

PRUNED = -1.0e9  # transformers' "never pick this" score in beam search; the same constant keeps sums identical


@dataclass
class Hypothesis:
    """A finished beam: its new tokens (ending with EOS, unless max_new_tokens cut it), its length-penalised score,
    the step that ended it and the running beam (0..K-1 at step - 1) it extended."""

    score: float
    tokens: torch.Tensor
    step: int
    parent: int


@dataclass
class Trace:
    """What each step saw and chose (`return_trace=True`): enough to plot the probabilities or draw the beam tree.

    scores: per step (R, V), the processed scores the choice was made from (beam search: processed log-probs).
    tokens: per step, greedy and sampling (R,) the chosen tokens; beam search (B, K) the token each running beam
        took. parents: beam search, per step (B, K), the running beam of the previous step each one extends (at
        step 0 all come from the prompt, beam 0). beam_scores: beam search, per step (B, K), summed log-probs
        (at max_new_tokens every candidate ends, so the beams recorded at that last step are pruned, at -1e9).
    hypotheses: beam search, per example, the finished hypotheses kept, best first.
    """

    scores: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    parents: list = field(default_factory=list)
    beam_scores: list = field(default_factory=list)
    hypotheses: list = field(default_factory=list)


# ----------------------------------------------------------------------------- the language model, step by step


@dataclass
class DecodeState:
    """What the language model needs between steps; row r of every tensor is row r of the batch being decoded."""

    cache: KVCache | T5Cache | None
    attention_mask: torch.Tensor | None = None  # LLaMA: (R, S) cached + next token; None when nothing is padded
    positions: torch.Tensor | None = None  # LLaMA: (R, S) rotary position of every token so far
    encoder_hidden: torch.Tensor | None = None  # T5: (B, S_enc, D), shared by each example's R / B rows
    encoder_mask: torch.Tensor | None = None  # T5: (B, S_enc)
    inputs: torch.Tensor | None = None  # without a cache: everything fed so far, LLaMA (R, S, D), T5 ids (R, S)
    prompt_length: int = 0  # LLaMA: cache slots the prompt fills

    def reorder(self, rows: torch.LongTensor) -> None:
        """Beam search: row r continues old row rows[r]. Masks and positions are equal within an example."""
        if self.cache is not None:
            # The beams of an example share its prompt: only the slots written since then need to move.
            self.cache.reorder(rows, start=self.prompt_length)
        else:
            self.inputs = self.inputs[rows]


def prefill(model, inputs_embeds, attention_mask, copies, max_new_tokens, use_cache):
    """Run the whole prompt (B, L, D) once; each example then has `copies` rows in a row (its beams or samples),
    R = B * copies, which share its prompt in the cache.

    Returns the first next-token logits (R, V) and the state to continue from.
    """
    lm = model.language_model
    if model.config.is_encoder_decoder:
        # T5 reads the prompt once with its encoder, whose output the copies share (t5.T5Attention.attend); the
        # decoder starts from decoder_start_token_id (the pad, 0). Its cache has a slot to spare, as LLaMA's (which
        # never holds the last token): a step's keys are never the whole buffer (always spaced alike for the compiled
        # decode attention) and the last step writes its token as whole blocks do (decode_blocks._write).
        encoder_hidden = lm.encode(inputs_embeds, attention_mask)  # (B, L, D)
        R = attention_mask.shape[0] * copies
        start = torch.full((R, 1), model.config.text.decoder_start_token_id, device=attention_mask.device)
        cache = lm.new_cache(R, max_new_tokens + 1, rows_per_example=copies) if use_cache else None
        state = DecodeState(cache, encoder_hidden=encoder_hidden, encoder_mask=attention_mask, inputs=start)
        return lm.decode(start, encoder_hidden, attention_mask, cache=cache, only_last_logits=True)[:, -1], state
    B, L = attention_mask.shape
    # Left-padded prompts: each row's first real token sits at position 0 (pads get 0 too, as in transformers 5.24;
    # no one attends to them).
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, L)
    mask = None if bool(attention_mask.all()) else attention_mask  # no padding: the plain causal path
    # A prompt runs once, its copies sharing its keys and values (KVCache.share_prompt; transformers runs each copy).
    cache = lm.new_cache(B, L + (max_new_tokens if copies == 1 else 0)) if use_cache else None
    logits = lm(inputs_embeds, mask, positions, cache, only_last_logits=True)[:, -1]  # (B, V)
    if cache is not None and copies > 1:
        cache.share_prompt(copies, max_new_tokens)

    def rows(t):  # (B, ...) -> (R, ...): each example's copies one after the other
        return None if t is None else t.repeat_interleave(copies, dim=0)
    state = DecodeState(cache, attention_mask=rows(mask), positions=rows(positions),
                        inputs=None if use_cache else rows(inputs_embeds), prompt_length=L)
    return rows(logits), state


def decode_one_token(model, state: DecodeState, tokens: torch.LongTensor) -> torch.Tensor:
    """Feed one new token per row (R,); the next-token logits (R, V). Without a cache, recompute everything."""
    lm = model.language_model
    if model.config.is_encoder_decoder:
        new = tokens[:, None]  # (R, 1)
        if state.cache is None:
            state.inputs = new = torch.cat([state.inputs, new], dim=1)  # (R, 1 + t)
        return lm.decode(new, state.encoder_hidden, state.encoder_mask, cache=state.cache, only_last_logits=True)[:, -1]
    new = lm.embed_tokens(tokens[:, None])  # (R, 1, D)
    position = state.positions[:, -1:] + 1  # (R, 1): right after the row's last token, padded or not
    state.positions = torch.cat([state.positions, position], dim=1)  # (R, S)
    if state.attention_mask is not None:
        state.attention_mask = F.pad(state.attention_mask, (0, 1), value=1)  # (R, S): the new token is real
    if state.cache is None:
        state.inputs = torch.cat([state.inputs, new], dim=1)  # (R, S, D)
        return lm(state.inputs, state.attention_mask, state.positions, only_last_logits=True)[:, -1]
    return lm(new, state.attention_mask, position, state.cache)[:, -1]


def decode_step(model, state: DecodeState, tokens: torch.LongTensor, step: int, max_new_tokens: int) -> torch.Tensor:
    """decode_one_token at `step` (1..) of up to max_new_tokens. A speed concern, not generation's: the first step
    tells compiling.py whether the steps to come pay for compiling its kernels (compiling.first_of); each step sets
    dynamo's switches once for its compiled calls (compiling.settings)."""
    with compiling.settings():
        if step == 1:
            return compiling.first_of(max_new_tokens - 1, decode_one_token, model, state, tokens)
        return decode_one_token(model, state, tokens)


# ----------------------------------------------------------------------------- logits processors


@dataclass
class Rules:
    """The arguments that shape the scores, checked (see `check_arguments`)."""

    eos: int | None
    pad: int | None
    min_new_tokens: int
    repetition_penalty: float
    no_repeat_ngram_size: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    left_pads: torch.Tensor | None  # (R,) how many left pads each prompt has: the repetition penalty skips them


def process(scores, history, step, rules: Rules, min_tokens_to_keep=1):
    """Apply the logits processors in transformers' order: (R, V) scores, history (R, L + step) -> (R, V)."""
    if rules.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, history, rules.repetition_penalty, rules.left_pads)
    if rules.no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(scores, history, rules.no_repeat_ngram_size)
    if step < rules.min_new_tokens and rules.eos is not None:
        scores = scores.clone()
        scores[:, rules.eos] = -math.inf
    if rules.do_sample:
        if rules.temperature != 1.0:
            scores = scores / rules.temperature
        if rules.top_k > 0:
            kth_best = scores.topk(min(max(rules.top_k, min_tokens_to_keep), scores.shape[-1])).values[:, -1:]
            scores = scores.masked_fill(scores < kth_best, -math.inf)  # ties with the k-th best all stay
        if rules.top_p < 1.0:
            scores = nucleus(scores, rules.top_p, min_tokens_to_keep)
    return scores


def repetition_penalty(scores, history, penalty, left_pads):
    """Make every token already in the history less likely: a positive score / penalty, a negative one * penalty.

    The history is the whole input_ids (visual placeholders and BOS included) plus the new tokens, for T5 the
    decoder start token plus the new tokens. transformers 5.24 skips the prompt's left padding (`left_pads`).
    """
    V = scores.shape[-1]
    ids = history.clamp(max=V)  # ids the lm_head cannot produce (a placeholder past V) go to a spare column
    if left_pads is not None:
        ids = ids.masked_fill(torch.arange(ids.shape[1], device=ids.device) < left_pads[:, None], V)
    padded = F.pad(scores, (0, 1))  # (R, V + 1)
    seen = padded.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[:, :V]


def ban_repeated_ngrams(scores, history, n):
    """Forbid any token that would complete an n-gram already in the history (prompt included, as transformers)."""
    length, V = history.shape[1], scores.shape[-1]
    if length < n:
        return scores
    prefix = history[:, length + 1 - n :]  # (R, n - 1): the n-gram the next token would complete starts with it
    windows = history.unfold(1, n, 1)  # (R, length - n + 1, n): every n-gram so far
    matches = (windows[..., :-1] == prefix[:, None]).all(-1)  # (R, windows)
    banned = torch.zeros(scores.shape[0], V + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)  # non-matches: spare column
    return scores.masked_fill(banned[:, :V], -math.inf)


def nucleus(scores, top_p, min_tokens_to_keep):
    """Top-p: keep the most probable tokens whose probabilities sum to top_p, the one crossing it included."""
    ascending, order = scores.sort(dim=-1)
    cumulative = ascending.softmax(-1).cumsum(-1)  # (R, V), from the least probable up
    drop = cumulative <= 1 - top_p
    drop[:, -min_tokens_to_keep:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), -math.inf)


# ----------------------------------------------------------------------------- greedy decoding and sampling


def greedy_or_sample(model, inputs_embeds, attention_mask, history, rules, max_new_tokens, generator, trace,
                     use_cache):
    """One sequence per row of history (R = B * num_return_sequences). The new tokens (R, steps), padded after EOS."""
    copies = history.shape[0] // inputs_embeds.shape[0]
    logits, state = prefill(model, inputs_embeds, attention_mask, copies, max_new_tokens, use_cache)
    finished = torch.zeros(history.shape[0], dtype=torch.bool, device=history.device)
    new_tokens = []
    for step in range(max_new_tokens):
        if step > 0:
            logits = decode_step(model, state, tokens, step, max_new_tokens)
        # Greedy and sampling process the raw logits (beam search processes log-probs).
        scores = process(logits.float(), history, step, rules)
        if rules.do_sample:
            tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]  # (R,)
        else:
            tokens = scores.argmax(-1)  # (R,)
        if rules.eos is not None:
            tokens = tokens.masked_fill(finished, rules.pad)  # a finished row only pads, until every row is done
            finished |= tokens == rules.eos
        history = torch.cat([history, tokens[:, None]], dim=1)  # (R, L + step + 1)
        new_tokens.append(tokens)
        if trace is not None:
            trace.scores.append(scores)
            trace.tokens.append(tokens)
        if bool(finished.all()):
            break
    return torch.stack(new_tokens, dim=1)


# ----------------------------------------------------------------------------- beam search


def beam_search(model, inputs_embeds, attention_mask, history, rules, max_new_tokens, num_beams, length_penalty,
                early_stopping, num_return_sequences, generator, trace, use_cache):
    """The textbook loop: expand every beam by every token, keep the best, set finished hypotheses aside, stop.

    Returns the num_return_sequences best hypotheses of each example, (B * num_return_sequences, longest).
    """
    K = num_beams
    B = history.shape[0] // K
    prompt_length = history.shape[1]
    logits, state = prefill(model, inputs_embeds, attention_mask, K, max_new_tokens, use_cache)
    # The K beams of an example start as K copies of the prompt: only the first may expand at step one, or they
    # would all pick the same tokens.
    beam_scores = torch.zeros(B, K, device=history.device)
    beam_scores[:, 1:] = PRUNED
    hypotheses = [[] for _ in range(B)]  # per example, the finished ones, best first, at most K
    closed = [False] * B  # an example whose hypotheses can no longer change
    batch_offset = torch.arange(B, device=history.device)[:, None] * K  # (B, 1): row of each example's beam 0
    for step in range(max_new_tokens):
        if step > 0:
            logits = decode_step(model, state, tokens.flatten(), step, max_new_tokens)

        # 1. Expand: score every (beam, token) by the beam's summed log-probs. Beam search applies the processors
        #    to log-probs, not to logits as greedy decoding does.
        log_probs = process(F.log_softmax(logits.float(), dim=-1), history, step, rules, min_tokens_to_keep=2)
        V = log_probs.shape[-1]
        candidates = (log_probs.view(B, K, V) + beam_scores[:, :, None]).view(B, K * V)

        # 2. Score: keep the 2K best candidates; even if K of them end here, K others carry the search on.
        if rules.do_sample:
            picked = torch.multinomial(candidates.softmax(-1), 2 * K, generator=generator)  # (B, 2K)
            top_scores, order = candidates.gather(1, picked).sort(dim=-1, descending=True)
            top_index = picked.gather(1, order)
        else:
            top_scores, top_index = candidates.topk(2 * K)  # (B, 2K), best first
        parents, top_tokens = top_index // V, top_index % V  # (B, 2K): which beam, which token
        # A candidate ends with EOS, and every candidate ends at the last step.
        ends = (top_tokens == rules.eos) if rules.eos is not None else torch.zeros_like(top_tokens, dtype=torch.bool)
        if step == max_new_tokens - 1:
            ends = torch.ones_like(ends)

        # 3. Set finished hypotheses aside. Only an ending candidate that ranks among the K best counts; its score
        #    is divided by (number of new tokens, EOS included) ** length_penalty.
        final_scores = (top_scores / ((step + 1) ** length_penalty)).tolist()
        for b, rank in ends[:, :K].nonzero().tolist():
            if closed[b]:
                continue
            row = b * K + parents[b, rank].item()
            tokens_so_far = torch.cat([history[row, prompt_length:], top_tokens[b, rank : rank + 1]])
            hypotheses[b].append(Hypothesis(final_scores[b][rank], tokens_so_far, step, parents[b, rank].item()))
            hypotheses[b].sort(key=lambda h: h.score, reverse=True)  # stable: on a tie the older one stays first
            del hypotheses[b][K:]

        # 4. Keep the best: the K best candidates that did not end become the running beams.
        still_running = top_scores + ends.float() * PRUNED  # (B, 2K); if fewer than K go on, pruned ones fill in
        beam_scores, keep = still_running.topk(K)  # (B, K)
        parents, tokens = parents.gather(1, keep), top_tokens.gather(1, keep)  # (B, K)
        rows = (batch_offset + parents).flatten()  # (B*K,): the row each running beam continues
        history = torch.cat([history[rows], tokens.flatten()[:, None]], dim=1)  # (B*K, L + step + 1)
        if trace is not None:
            trace.scores.append(log_probs)
            trace.tokens.append(tokens)
            trace.parents.append(parents)
            trace.beam_scores.append(beam_scores)
        if step == max_new_tokens - 1:
            break
        state.reorder(rows)

        # 5. Stop when no example can still change its hypotheses.
        for b in range(B):
            closed[b] = closed[b] or is_done(hypotheses[b], beam_scores[b, :1], K, step, max_new_tokens,
                                              length_penalty, early_stopping)
        if all(closed):
            break

    if trace is not None:
        trace.hypotheses = hypotheses
    best = [h.tokens for example in hypotheses for h in example[:num_return_sequences]]
    return pad_rows(best, rules.pad)


def is_done(hypotheses, best_running_score, K, step, max_new_tokens, length_penalty, early_stopping):
    """transformers' stopping rule for one example, after `step`, once it holds K finished hypotheses.

    early_stopping=True: done as soon as there are K. Otherwise done when the best running beam cannot beat the
    worst kept hypothesis, its score estimated at its current length (False), or, for "never" with a positive
    length_penalty, at max_new_tokens, the most a longer answer could gain.
    """
    if len(hypotheses) < K:
        return False
    if early_stopping is True:
        return True
    length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else step + 1
    best_possible = (best_running_score / (length**length_penalty)).item()
    return not best_possible > hypotheses[-1].score


def pad_rows(rows, pad):
    """Stack token rows of different lengths, padding each after its end: (len(rows), longest)."""
    # transformers pads beam search output with `pad_token_id or eos_token_id` and so with EOS when pad is 0 (T5,
    # tiny LLaMA); minivb pads with pad_token_id as greedy decoding does. Tokens up to each EOS are the same.
    longest = max(len(row) for row in rows)
    out = rows[0].new_full((len(rows), longest), pad if pad is not None else 0)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


# ----------------------------------------------------------------------------- the entry point


@torch.no_grad()
def generate(model, pixel_values=None, qformer_input_ids=None, qformer_attention_mask=None, input_ids=None,
             attention_mask=None, *, max_new_tokens=30, min_new_tokens=0, num_beams=1, length_penalty=1.0,
             early_stopping=False, num_return_sequences=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
             do_sample=False, temperature=1.0, top_k=0, top_p=1.0, generator=None, eos_token_id=None,
             pad_token_id=None, return_trace=False, interpolate_pos_encoding=False, use_cache=True, **unexpected):
    """Answer tokens for a batch: (B * num_return_sequences, longest), new tokens only, padded after each EOS.

    The batch keys are those of the model's forward. eos_token_id defaults to the checkpoint's
    text_config.eos_token_id, as in transformers (the official Vicuna config says 1, an artefact: the processor and
    the CLI pass the tokenizer's `</s>`, 2, which is how that checkpoint ends its answers); pad_token_id to
    text_config.pad_token_id, or to the eos when there is none. With return_trace=True, returns (ids, Trace).
    use_cache=False recomputes the whole sequence at every step (slow; it exists to check the cache).
    """
    if unexpected:
        raise ValueError(f"generate() got unexpected arguments {sorted(unexpected)}")
    if pixel_values is None or qformer_input_ids is None or input_ids is None:
        raise ValueError("generate() needs pixel_values, qformer_input_ids and input_ids (see minivb.load_processor)")
    check_arguments(locals())
    config = model.config.text
    eos = special_token("eos_token_id", eos_token_id, config.eos_token_id, config.vocab_size)
    pad = special_token("pad_token_id", pad_token_id, config.pad_token_id if config.pad_token_id is not None else eos,
                        config.vocab_size)
    is_t5 = model.config.is_encoder_decoder
    if not is_t5:  # before the vision encoder, which takes minutes for the many frames that would not fit
        check_context(model.config, pixel_values, input_ids, max_new_tokens)
    video = model.encode_video(pixel_values, qformer_input_ids, qformer_attention_mask, interpolate_pos_encoding)
    inputs_embeds, attention_mask, _ = model.embed_inputs(video.visual_tokens, input_ids, attention_mask)
    if is_t5:
        history = torch.full((input_ids.shape[0], 1), model.config.text.decoder_start_token_id, device=input_ids.device)
    else:
        history = input_ids.long()  # with no placeholders (visual tokens prepended), the text alone
    trace = Trace() if return_trace else None
    if max_new_tokens == 0:
        ids = input_ids.new_zeros((input_ids.shape[0] * num_return_sequences, 0))
        return (ids, trace) if return_trace else ids

    # Every copy of an example (a beam, a returned sample) starts from the same prompt, repeated row by row.
    copies = max(num_beams, num_return_sequences)
    history = history.repeat_interleave(copies, dim=0)  # (R, L)
    left_pads = None
    if not is_t5 and not bool(attention_mask.all()):
        left_pads = (attention_mask != 0).int().argmax(dim=1).repeat_interleave(copies)  # (R,) index of the first 1
    rules = Rules(eos, pad, min_new_tokens, float(repetition_penalty), no_repeat_ngram_size, do_sample,
                  float(temperature), top_k, float(top_p), left_pads)
    if num_beams == 1:
        ids = greedy_or_sample(model, inputs_embeds, attention_mask, history, rules, max_new_tokens, generator,
                               trace, use_cache)
    else:
        ids = beam_search(model, inputs_embeds, attention_mask, history, rules, max_new_tokens, num_beams,
                          length_penalty, early_stopping, num_return_sequences, generator, trace, use_cache)
    return (ids, trace) if return_trace else ids
