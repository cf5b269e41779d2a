"""The data path: traffic steering, the relay and splice, DNS relay, per-flow sessions and kernel rules."""
