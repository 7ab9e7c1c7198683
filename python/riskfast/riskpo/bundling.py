"""Groups and bundles: who answered which question, and which responses form a member.

Spec: ``riskpo.md`` section 1. Vocabulary: a *bundle* is a set of B questions; a
*member* of a bundle is one of its G disjoint response sets, holding exactly one
response of each of the bundle's questions. Member scores are sums (or means) of the
rewards of a member's responses.

Everything here is vectorised; there is no Python loop over questions or bundles.
Questions are numbered 0..Q-1 in order of first appearance in ``question_ids``, and
the responses of a question are numbered 0..G-1 ("positions") in input order.

Host synchronisation: :func:`group_layout` must read ``question_ids`` on the host (Q and
G are data); :func:`consecutive_layout` and :func:`draw_bundling` need no read at all,
so a CUDA caller that knows G and uses the consecutive layout never waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import as_tensor, require_integer, require_ndim, require_same_device


@dataclass(frozen=True)
class GroupLayout:
    """Where each question's responses sit in the flat batch.

    Attributes:
        question_index: ``[N]`` int64, first-appearance index of each response's question.
        position: ``[N]`` int64, index of each response among its question's (input order).
        response_index: ``[Q, G]`` int64, ``response_index[q, p]`` is the flat index of
            the response at position ``p`` of question ``q``.
        num_questions: Q.
        group_size: G, the number of responses of every question.
    """

    question_index: torch.Tensor
    position: torch.Tensor
    response_index: torch.Tensor
    num_questions: int
    group_size: int


@dataclass(frozen=True)
class Bundling:
    """An assignment of questions to bundles and of responses to members.

    Attributes:
        question_bundle: ``[Q]`` int64, bundle (0..nb-1) of each question.
        question_slot: ``[Q]`` int64, rank of the question inside its bundle.
        member_of_position: ``[Q, G]`` int64, member (0..G-1) of each response.
        bundle_num_questions: ``[nb]`` int64, question count of each bundle.
        num_bundles: nb.
        max_bundle_questions: the largest bundle's question count.
    """

    question_bundle: torch.Tensor
    question_slot: torch.Tensor
    member_of_position: torch.Tensor
    bundle_num_questions: torch.Tensor
    num_bundles: int
    max_bundle_questions: int

    def response_bundle_ids(self, layout: GroupLayout) -> torch.Tensor:
        """``[N]`` bundle id of every response."""
        return self.question_bundle[layout.question_index]

    def response_member_ids(self, layout: GroupLayout) -> torch.Tensor:
        """``[N]`` member id of every response."""
        return self.member_of_position[layout.question_index, layout.position]


def _first_appearance_ranks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relabel ``labels`` [N] as 0..U-1 in order of first appearance.

    Returns the relabelled ``[N]`` tensor and the ``[U]`` counts per new label.
    """
    uniques, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    n = labels.numel()
    positions = torch.arange(n, device=labels.device)
    first = torch.full((uniques.numel(),), n, dtype=torch.long, device=labels.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=labels.device)
    return rank[inverse], counts[order]


def group_layout(question_ids: torch.Tensor) -> GroupLayout:
    """Check that every question has the same number G of responses and index them.

    Args:
        question_ids: ``[N]`` integer tensor, the question each response answers.

    Raises:
        ValueError: naming ``question_ids`` and the questions whose counts differ.
    """
    question_index, counts = _first_appearance_ranks(question_ids)
    # One host read for both ends of the counts (unique above was the other one).
    fewest, most = torch.stack([counts.min(), counts.max()]).tolist()
    if fewest != most:
        uniques, first_counts = torch.unique(question_ids, return_counts=True)
        common = int(torch.mode(first_counts).values)
        odd = (first_counts != common).nonzero().flatten()[:10].tolist()
        details = ", ".join(f"question {int(uniques[i])} has {int(first_counts[i])}" for i in odd)
        raise ValueError(
            "question_ids: every question needs the same number of responses "
            f"(most have {common}); {details}"
        )
    num_questions = counts.numel()
    group_size = int(fewest)
    response_index = torch.sort(question_index, stable=True).indices.view(num_questions, group_size)
    position = torch.empty_like(question_index)
    position[response_index] = torch.arange(group_size, device=question_ids.device).expand(
        num_questions, group_size
    )
    return GroupLayout(question_index, position, response_index, num_questions, group_size)


def consecutive_layout(num_responses: int, group_size: int, device: torch.device) -> GroupLayout:
    """The layout of responses stored question by question: ``n // G`` answers question ``n // G``.

    This is how TRL (each prompt repeated G times in a row) and verl (``rollout.n`` with
    interleaved repeats) lay out a generation batch. Equal to
    ``group_layout(arange(N) // G)``, computed from the sizes alone (no host read).

    Args:
        num_responses: N, a multiple of ``group_size``.
        group_size: G >= 1.
        device: where the index tensors live.
    """
    flat = torch.arange(num_responses, device=device)
    return GroupLayout(
        question_index=flat // group_size,
        position=flat % group_size,
        response_index=flat.view(num_responses // group_size, group_size),
        num_questions=num_responses // group_size,
        group_size=group_size,
    )


def _bundling_from_question_bundle(
    question_bundle: torch.Tensor,
    member_of_position: torch.Tensor,
    sizes: tuple[torch.Tensor, int] | None = None,
) -> Bundling:
    """Complete a bundling from the bundle of each question (ids 0..nb-1, all used).

    A question's slot is its rank among its bundle's questions in question order (so a
    member sums its rewards in that order). ``sizes`` = (``[nb]`` question count of each
    bundle, the largest count) when the caller knows them; otherwise they are counted,
    which reads the device (``bincount``, ``max``).
    """
    if sizes is None:
        counts = torch.bincount(question_bundle)
        largest = int(counts.max())
    else:
        counts, largest = sizes
    order = torch.sort(question_bundle, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(question_bundle)
    slot[order] = torch.arange(order.numel(), device=order.device) - starts[question_bundle[order]]
    return Bundling(
        question_bundle=question_bundle,
        question_slot=slot,
        member_of_position=member_of_position,
        bundle_num_questions=counts,
        num_bundles=counts.numel(),
        max_bundle_questions=largest,
    )


def draw_bundling(
    layout: GroupLayout,
    bundle_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
) -> Bundling:
    """Split the questions into bundles of ``bundle_size`` and the responses into members.

    ``shuffle=True`` draws (spec section 1) a random partition of the questions,
    ``perm = randperm(Q)``, bundle k holding ``perm[kB:(k+1)B]``, and for each question an
    independent permutation ``xi = argsort(rand(Q, G), dim=1)``; member j holds the
    response at position ``xi[q, j]`` of every question q of the bundle. The two draws
    come from ``generator`` in that order. ``shuffle=False`` takes consecutive questions
    (first-appearance order) and member j = position j, as the paper's reference code.
    If Q is not a multiple of B the last bundle is smaller.

    Bundles are numbered by slot, so their sizes are known from Q and B alone and no
    value is read back from the device (draws on a CPU generator reach a CUDA device
    through pinned memory, asynchronously).
    """
    device = layout.response_index.device
    q, g = layout.num_questions, layout.group_size
    slots = torch.arange(q, device=device)
    num_bundles = -(-q // bundle_size)
    if shuffle:
        draw_device = generator.device if generator is not None else device
        perm = _to_device(torch.randperm(q, generator=generator, device=draw_device), device)
        keys = _to_device(torch.rand(q, g, generator=generator, device=draw_device), device)
        question_bundle = torch.empty(q, dtype=torch.long, device=device)
        question_bundle[perm] = slots // bundle_size
        # xi[q, j] = position taken by member j; its inverse maps position -> member.
        member_of_position = torch.argsort(torch.argsort(keys, dim=1), dim=1)
    else:
        question_bundle = slots // bundle_size
        member_of_position = torch.arange(g, device=device).expand(q, g).clone()
    # B questions per bundle, fewer in the last: min(B, Q - b B), from the sizes alone.
    bundle_starts = torch.arange(num_bundles, device=device) * bundle_size
    counts = (q - bundle_starts).clamp_max(bundle_size)
    return _bundling_from_question_bundle(
        question_bundle, member_of_position, sizes=(counts, min(bundle_size, q))
    )


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a generator's draw to ``device`` without blocking the host (pinned, async copy)."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def question_bundling(layout: GroupLayout) -> Bundling:
    """Each question its own bundle and each response its own member (mean estimators)."""
    return draw_bundling(layout, 1, shuffle=False, generator=None)


def explicit_bundling(
    layout: GroupLayout, bundle_ids: object, member_ids: object, reference: torch.Tensor
) -> Bundling:
    """Validate a caller-given bundling and bring it to the canonical form.

    Args:
        bundle_ids: ``[N]`` integer labels; all responses of a question share one.
            Labels are renumbered 0..nb-1 in order of first appearance.
        member_ids: ``[N]`` integers; for every question a permutation of 0..G-1.
        reference: the rewards tensor, for shape and device checks.
    """
    bundle_ids = as_tensor("bundle_ids", bundle_ids)
    member_ids = as_tensor("member_ids", member_ids)
    for name, ids in (("bundle_ids", bundle_ids), ("member_ids", member_ids)):
        require_integer(name, ids)
        require_ndim(name, ids, 1, "[N]")
        if ids.numel() != reference.numel():
            raise ValueError(f"{name}: has {ids.numel()} entries, rewards has {reference.numel()}")
        require_same_device(name, ids, "rewards", reference)
    g = layout.group_size
    per_question_bundle = bundle_ids.long()[layout.response_index]
    if bool((per_question_bundle != per_question_bundle[:, :1]).any()):
        raise ValueError("bundle_ids: all responses of a question must be in the same bundle")
    members = member_ids.long()[layout.response_index]
    expected = torch.arange(g, device=members.device).expand_as(members)
    if bool((torch.sort(members, dim=1).values != expected).any()):
        raise ValueError(
            f"member_ids: the responses of each question must carry member ids 0..{g - 1}, "
            "each exactly once"
        )
    question_bundle, _ = _first_appearance_ranks(per_question_bundle[:, 0])
    return _bundling_from_question_bundle(question_bundle, members)


def member_response_table(layout: GroupLayout, bundling: Bundling) -> torch.Tensor:
    """Flat response index held by each member for each question slot: ``[nb, B_max, G]``.

    ``table[b, k, j]`` is the response that member ``j`` of bundle ``b`` holds for the
    bundle's ``k``-th question; slots beyond a smaller bundle's question count hold -1.
    This is the layout the bundle-advantages kernel reads.
    """
    q, g = layout.num_questions, layout.group_size
    table = torch.full(
        (bundling.num_bundles, bundling.max_bundle_questions, g),
        -1,
        dtype=torch.long,
        device=layout.response_index.device,
    )
    rows = bundling.question_bundle[:, None].expand(q, g)
    slots = bundling.question_slot[:, None].expand(q, g)
    table[rows, slots, bundling.member_of_position] = layout.response_index
    return table


def gather_member_rewards(rewards: torch.Tensor, member_response: torch.Tensor) -> torch.Tensor:
    """Rewards laid out as :func:`member_response_table`: ``[nb, B_max, G]``, 0 in empty slots.

    The layout makes the member-score sum a plain, deterministic reduction over dim 1.
    """
    present = member_response >= 0
    return torch.where(
        present, rewards[member_response.clamp_min(0)], torch.zeros_like(rewards[:1])
    )
