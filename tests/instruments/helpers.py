"""Shared test helper: an ordinary training loop with a Monitor around optimizer.step()."""

from gradkit.instruments import Monitor


def monitored_steps(model, loss_fn, opt, x, y, instruments, steps=2, **monitor_kwargs):
    mon = Monitor(model, loss_fn, opt, instruments=instruments, **monitor_kwargs)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        with mon.step((x, y), loss=loss):
            opt.step()
    return mon
