"""fov_frames baseline: greedy field-of-view coverage picks the bank frames that look where the target looks."""
from __future__ import annotations

import math

import torch

from decmem.model.attention import AttentionArgs, DecMemAttention
from decmem.model.retrieval import select_fov_frames, visibility

HW = (64, 64)


def K_(n):
    K = torch.tensor([[50.0, 0, 32], [0, 50.0, 32], [0, 0, 1]], dtype=torch.float64)
    return K.expand(1, n, 3, 3).clone()


def yaw_c2w(yaws_deg, pos=(0.0, 0.0, 0.0)):
    """OpenCV cameras at pos, rotated about the world y axis (down)."""
    out = []
    for y in yaws_deg:
        a = math.radians(y)
        R = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=torch.float64)
        M = torch.eye(4, dtype=torch.float64)
        M[:3, :3], M[:3, 3] = R, torch.tensor(pos, dtype=torch.float64)
        out.append(M)
    return torch.stack(out).unsqueeze(0)


def test_picks_frame_looking_at_the_same_place():
    yaws = [0, 45, 90, 135, 180, 225, 270, 315] * 2               # a camera that spins twice
    Kb, cb = K_(len(yaws)), yaw_c2w(yaws)
    Kt, ct = K_(1), yaw_c2w([137], pos=(0.05, 0.0, -0.05))        # looks where frames 3 and 11 looked
    frames, valid = select_fov_frames(Kb, cb, Kt, ct, HW, k=3, eligible_frames=14, chunk_start=16)
    assert valid.all()
    assert frames[0, 0].item() == 3                               # equal coverage: the lower index wins
    assert set(frames[0].tolist()) >= {3}
    # with an age penalty, the newer revisit (frame 11) wins; frames >= 14 are never candidates
    frames, _ = select_fov_frames(Kb, cb, Kt, ct, HW, k=3, eligible_frames=14, chunk_start=16, age_penalty=0.01)
    assert frames[0, 0].item() == 11
    assert (frames < 14).all()
    # the opposite view (yaw 315 = -45 away from 137 by 178 degrees) never helps first
    assert frames[0, 0].item() not in (7, 15)


def test_visibility_respects_image_bounds_and_depth_sign():
    K, c2w = K_(1), yaw_c2w([0])
    pts = torch.tensor([[[0.0, 0.0, 2.0], [0.0, 0.0, -2.0], [5.0, 0.0, 1.0]]], dtype=torch.float64)
    assert visibility(pts, K, c2w, HW)[0, 0].tolist() == [True, False, False]


def test_fov_strategy_reads_whole_selected_frames():
    torch.manual_seed(0)
    m = DecMemAttention(16, 2, AttentionArgs(strategy="fov_frames", block_size=4, window=2)).double()
    mem = torch.randn(1, 10 * 8, 16, dtype=torch.float64)
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    _, bank = m.encode_memory(mem, 8)
    frames, valid = torch.tensor([[2, 5]]), torch.tensor([[True, True]])
    out, _ = m(x, bank, 10, 8, fov_frames=(frames, valid))
    # reference: one softmax over frames 2, 5, the ALM window frame 9, and the chunk
    from reference import reference_dense
    keep = [2, 5, 9]
    ref = reference_dense(m, x, bank.k[:, :, keep], bank.v[:, :, keep], 3, 8)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
