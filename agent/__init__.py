"""The eecp tunnel client that runs inside the TDX VM (see issue 3; not yet implemented).

It shares :mod:`eecp.measurements` with the control plane so that the report_data it asks its
TD to quote is built by the same code eecp checks it with.
"""
