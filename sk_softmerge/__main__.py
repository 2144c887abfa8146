"""``python -m sk_softmerge``: train, merge and compare a few small nets."""

from ._demo import main

main()
