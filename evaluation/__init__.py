"""Generation and evaluation: `decmem generate`, the eval protocol, revisit scoring, metrics, figures (DESIGN §7)."""
