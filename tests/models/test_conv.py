"""The conv4 body (GEM-BML appendix C.4.2) and its grouped-convolution batched forward."""

import pytest
import torch
from torch.func import functional_call

from hbmeta.models import BatchedNet, Conv4

VARIANTS = {
    "omniglot": (lambda: Conv4.omniglot(5), (1, 28, 28)),
    "miniimagenet": (lambda: Conv4.miniimagenet(5), (3, 84, 84)),
}


def _loop(net: Conv4, theta, x):
    """The reference: one ``functional_call`` per (sample, task)."""
    batched = BatchedNet(net)
    return torch.stack([torch.stack([functional_call(net, batched.unflatten(theta[b, t]), (x[t],))
                                     for t in range(x.shape[0])]) for b in range(theta.shape[0])])


def _weights_and_images(name, samples=2, tasks=3, images=4):
    make, image_shape = VARIANTS[name]
    net = make()
    theta0 = BatchedNet(net).initial_vector()
    theta = (theta0 + 0.1 * theta0.abs().mean() * torch.randn(samples, tasks, theta0.numel())).requires_grad_()
    return net, theta, torch.randn(tasks, images, *image_shape)


@pytest.mark.parametrize("name", VARIANTS)
def test_output_shapes_of_plain_and_batched_forward(name):
    net, theta, x = _weights_and_images(name, samples=2, tasks=3, images=2)
    assert net(x[0]).shape == (2, 5)
    assert net.forward_batched(theta, x).shape == (2, 3, 2, 5)
    assert net.forward_batched(theta[0], x).shape == (3, 2, 5)


def test_hidden_layer_sizes_follow_maml():
    omniglot, mini = Conv4.omniglot(20), Conv4.miniimagenet(5)
    assert (omniglot.final_size, omniglot.hidden, omniglot.head.out_features) == (2, 64, 20)  # spatial mean
    assert (mini.final_size, mini.hidden) == (5, 800)  # flatten 32 x 5 x 5


def test_parameter_counts_equal_hand_counts():
    conv = lambda c_in, f: f * c_in * 9 + f  # noqa: E731
    omniglot = conv(1, 64) + 3 * conv(64, 64) + 4 * 2 * 64 + (64 * 5 + 5)
    mini = conv(3, 32) + 3 * conv(32, 32) + 4 * 2 * 32 + (800 * 5 + 5)
    assert (omniglot, mini) == (112261, 32901)
    assert Conv4.omniglot(5).num_params == BatchedNet(Conv4.omniglot(5)).num_params == omniglot
    assert Conv4.miniimagenet(5).num_params == BatchedNet(Conv4.miniimagenet(5)).num_params == mini


def test_batch_norm_has_no_buffers_and_uses_the_batch_statistics_in_train_and_eval():
    net = Conv4.omniglot(5)
    assert list(net.buffers()) == []
    x = torch.randn(6, 1, 28, 28)
    train_out = net.train()(x)
    torch.testing.assert_close(net.eval()(x), train_out)
    torch.testing.assert_close(net(x[:3]), net(torch.cat([x[:3], x[:3]]))[:3])  # statistics of the batch given


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_batched_and_its_gradient_equal_a_loop_of_functional_calls(name, float64):
    net, theta, x = _weights_and_images(name, samples=2, tasks=2, images=3)
    fast, ref = net.forward_batched(theta, x), _loop(net, theta, x)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-10)
    cotangent = torch.randn_like(fast)
    (grad_fast,) = torch.autograd.grad(fast, theta, cotangent)
    (grad_ref,) = torch.autograd.grad(ref, theta, cotangent)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=0, atol=1e-10)
    assert grad_fast.abs().max() > 1e-3


def test_double_backward_of_a_grad_norm_equals_the_loop(float64):
    net, theta, x = _weights_and_images("omniglot", samples=1, tasks=2, images=3)
    y = torch.randint(0, 5, (1, 2, 3))

    def grad_norm(logits):
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), y.reshape(-1))
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)  # MAML's inner step
        return g.square().sum()

    (fast,) = torch.autograd.grad(grad_norm(net.forward_batched(theta, x)), theta)
    (ref,) = torch.autograd.grad(grad_norm(_loop(net, theta, x)), theta)
    torch.testing.assert_close(fast, ref, rtol=1e-8, atol=1e-10)
    assert fast.abs().max() > 0


def test_batched_net_dispatches_to_forward_batched_with_any_sample_shape(monkeypatch):
    net, _, x = _weights_and_images("omniglot", tasks=3, images=2)
    batched = BatchedNet(net)
    assert batched._fast_batched and not batched._fast_mlp
    theta = batched.initial_vector() + 0.01 * torch.randn(2, 2, 3, batched.num_params)  # [S1, S2, T, P]
    calls = []

    def spy(theta, x):
        calls.append(theta.shape)
        return Conv4.forward_batched(net, theta, x)

    monkeypatch.setattr(net, "forward_batched", spy)
    fast = batched(theta, x)
    assert calls == [(4, 3, batched.num_params)] and fast.shape == (2, 2, 3, 2, 5)
    batched._fast_batched = False  # the generic vmap path
    torch.testing.assert_close(batched(theta, x), fast, rtol=1e-4, atol=1e-4)
    assert batched(theta[0, 0], x).shape == (3, 2, 5)


def test_wrong_images_or_weights_are_clear_errors():
    net = Conv4.omniglot(5)
    theta = BatchedNet(net).initial_vector().expand(2, -1)
    with pytest.raises(ValueError, match=r"expects x of shape \[T, N, 1, 28, 28\]; got \(2, 4, 3, 28, 28\)"):
        net.forward_batched(theta, torch.zeros(2, 4, 3, 28, 28))
    with pytest.raises(ValueError, match=r"expects x of shape \[T, N, 1, 28, 28\]; got \(2, 4, 1, 32, 32\)"):
        net.forward_batched(theta, torch.zeros(2, 4, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expects x of shape \[N, 1, 28, 28\]; got \(4, 784\)"):
        net(torch.zeros(4, 784))
    theta_error = r"expects theta \[B, T=3, P=112261\] or \[T, P\] for x \(3, 4, 1, 28, 28\); got \(2, 112261\)"
    with pytest.raises(ValueError, match=theta_error):
        net.forward_batched(theta, torch.zeros(3, 4, 1, 28, 28))
    with pytest.raises(ValueError, match="image_size 8 is too small"):
        Conv4(in_channels=3, filters=4, strided=False, image_size=8)
