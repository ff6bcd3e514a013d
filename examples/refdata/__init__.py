"""Reference data shared by a retail OMS, a smart order router and an institutional OMS.

``messages`` (the versioned protocol), ``machine`` (the ``ReferenceData`` state machine),
``venues`` (a second state machine), ``admin`` (the tool that submits changes), ``apps`` (the
three processes), ``demo`` (all of it on a local cluster), ``late_joiner`` (a late joiner from
a snapshot against a full replay of a long stream).
"""
