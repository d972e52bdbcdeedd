"""Ending a user's live Dovecot sessions through its doveadm HTTP API (`doveadm kick`).

`protocol` builds the request and reads the answer, without I/O; `client` sends it with treq.
"""
