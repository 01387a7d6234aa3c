"""Fault injection, for tests and experiments; nothing here runs unless a fault is asked for.

    inject     ``--inject SPEC``: kill, pause, partition ... at a step or a time
    messages   drop, duplicate or delay messages: a wrapper around a role's sockets
"""
