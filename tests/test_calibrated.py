"PPO-C's reward through PPO's reward call, as train_ppo makes it (TRL's signature with extra columns)."
import torch
from posttrain_nb.train.calibrated import PPOCReward, ppo_c_reward, parse_confidence
from posttrain_nb.train.ppo import call_reward


def test_ppoc_through_call_reward():
    seen = []
    w = torch.tensor(2.0, requires_grad=True)
    def score(prompts, texts):  # a differentiable toy RM: 'Answer: 3' is good
        seen.extend(texts)
        return w * torch.tensor([1.0 if "Answer: 3" in t else -1.0 for t in texts])
    f = PPOCReward(score, r_bar=0.0, alpha=0.25, w=2.0)
    rows = [{"prompt": "q", "answer": 3}] * 4
    texts = ["Answer: 3\nConfidence: 10.", "Answer: 4\nConfidence: 10.", "Answer: 4\nConfidence: 0.", "Answer: 3"]
    out = call_reward(f, rows, texts, [[1]] * 4)
    assert not any("Confidence" in t for t in seen)  # the RM never sees the confidence
    assert isinstance(f.r_bar, float)  # the running mean stays outside autograd
    r_bar = 0.25 * 0.0  # raw scores 2, -2, -2, 2 have mean 0
    expect = [ppo_c_reward(r, r_bar, parse_confidence(t), 2.0) for r, t in zip([2.0, -2.0, -2.0, 2.0], texts)]
    torch.testing.assert_close(out, torch.tensor(expect), rtol=0, atol=1e-6)
    # confident and right gains, confident and wrong loses, unsure and wrong loses less, no confidence is untouched
    assert out[0] > 2.0 and out[1] < -2.0 and out[2] > -2.0 and out[3] == 2.0
