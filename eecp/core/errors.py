"""Every error eecp raises on purpose, each with a stable machine-readable ``reason``.

The tree::

    EecpError                      reason, http_status
    ├── ConfigError                a bad EE_* variable: names it (exit status 2)
    ├── InputError                 unusable operator input (a file that is not a quote, ...)
    ├── StoreError                 the database did not answer or refused
    ├── StartupError               eecp cannot start: a listener it cannot bind (exit status 1)
    ├── ProtocolError              a tunnel message that cannot be accepted (+ WebSocket close code)
    ├── RegistrationError          a register that cannot be honoured (app_name_taken, ...)
    ├── AttestationError           a quote was not accepted (every refusal is one of these)
    │   ├── QuoteError             unparseable, failed verification, TCB status, debug TD
    │   ├── CollateralError        PCCS unreachable with nothing valid cached, expired
    │   ├── AllowlistError         not found, unreachable, malformed
    │   └── PolicyError            the quote verified but does not match what it must
    └── LedgerError                a ledger rule refused (the base itself: a broken invariant, 500)
        ├── LedgerInputError       400: the request is malformed (never stored for idempotency)
        │   └── BodyTooLargeError  413 ``body_too_large``
        ├── LedgerNotFoundError    404: ``account_not_found``, ``node_not_found``, ...
        └── LedgerConflictError    409: a business rejection (``insufficient_funds``, ...)

``reason`` strings are part of the public interface (they reach agents, proxies, logs and the
audit log): they are lower_snake_case, optionally followed by ``:detail`` — for example
``tcb_status:OutOfDate``, ``measurement_mismatch:agent_py_sha256`` or
``quote_measurement_mismatch:rtmr2``. Never change one without a migration note.
"""

from __future__ import annotations

import errno


class EecpError(Exception):
    """Base of every deliberate eecp error.

    ``reason`` is the stable machine-readable reason; ``detail`` is free text for humans and logs
    (never secrets); ``http_status`` is a hint for HTTP surfaces.
    """

    http_status: int = 500

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ConfigError(EecpError):
    """An ``EE_*`` variable (or CLI option) has a value eecp cannot use."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__("config_invalid", f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class InputError(EecpError):
    """Operator-supplied input (a file, an option) is unusable: the tool exits with status 2."""

    http_status = 400


class StoreError(EecpError):
    """The store could not complete an operation."""

    http_status = 503


class StartupError(EecpError):
    """eecp cannot start: ``listen_failed`` (a port in use, a privileged port, an address the
    host does not have). ``detail`` is the whole line the command prints: what (the listener
    and the variable setting it), where (the address) and the system's reason."""

    http_status = 503

    @classmethod
    def listen_failed(cls, listener: str, host: str, port: int, variables: tuple[str, str],
                      exc: OSError) -> StartupError:
        """``cannot listen on 127.0.0.1:9090 (proxy listener, EE_PROXY_PORT): address already
        in use``; ``variables`` are the (bind, port) variables: an address the host does not
        have is the bind's fault, anything else the port's."""
        bind_variable, port_variable = variables
        at_fault = bind_variable if exc.errno == errno.EADDRNOTAVAIL else port_variable
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        why = exc.strerror or str(exc) or type(exc).__name__
        return cls("listen_failed", f"cannot listen on {address} ({listener}, {at_fault}): "
                                    f"{why[:1].lower()}{why[1:]}")


class ProtocolError(EecpError):
    """A tunnel message eecp cannot accept: ``message_too_large``, ``invalid_json``,
    ``not_an_object``, ``unknown_type``, ``invalid_field:<name>``, ``binary_unexpected``,
    ``unexpected_message``. ``close_code`` is the WebSocket close code to end the session with."""

    http_status = 400

    def __init__(self, reason: str, detail: str = "", close_code: int = 1008) -> None:
        super().__init__(reason, detail)
        self.close_code = close_code


class RegistrationError(EecpError):
    """A register eecp will not honour: ``app_name_taken`` (another repo owns the name),
    ``network_unknown``, ``agent_id_in_use`` (the id is bound to another app or repo)."""

    http_status = 409


class AttestationError(EecpError):
    """A quote was not accepted. The ``reason`` says why, in a stable form."""

    http_status = 403


class QuoteError(AttestationError):
    """The quote itself: ``quote_malformed``, ``pck_chain_untrusted``, ``quote_invalid``,
    ``pck_revoked``, ``tcb_level_unmatched``, ``tcb_status:<S>``, ``debug_td``,
    ``tee_type_unsupported``."""


class CollateralError(AttestationError):
    """Collateral: ``collateral_unavailable`` (PCCS down, nothing valid cached),
    ``collateral_expired`` or ``collateral_mismatch`` (FMSPC differs from the quote's)."""

    http_status = 503


class AllowlistError(AttestationError):
    """Allowlist: ``allowlist_not_found``, ``allowlist_unavailable``,
    ``allowlist_malformed:<field>``, ``allowlist_invalid_ref`` (repo or tag not well-formed),
    ``allowlist_rate_limited`` (no GitHub fetch left for now: retry later)."""


class PolicyError(AttestationError):
    """The quote verified but breaks policy: ``report_data_mismatch``, ``nonce_mismatch``,
    ``measurements_binding_mismatch``, ``measurement_mismatch:<key>``,
    ``quote_measurement_mismatch:<register>``, ``sealed_required``,
    ``allowlist_report_data_mismatch``, ``network_unknown``, ``measurements_invalid:<key>``,
    ``platform_banned`` (the quote's platform belongs to a node the ledger banned)."""


#: what a ledger error may add to its JSON body (``settleable_at``, ``usage_id``, ...)
LedgerExtra = dict[str, str | int | bool | None]


class LedgerError(EecpError):
    """A ledger operation was refused (eecp/ledger/). Raised as the base class only for a broken
    internal rule (a bug: answered 500, the transaction rolls back); requests get a subclass.

    ``detail`` is a *stable* sub-reason where the spec lists one (``invalid_amount`` /
    ``exponent``, ``invalid_json`` / ``duplicate_key``, ``invalid_period`` / ``unaligned``);
    ``field`` names the request field at fault; ``extra`` holds further body members.
    """

    def __init__(self, reason: str, detail: str = "", *, field: str | None = None,
                 extra: LedgerExtra | None = None) -> None:
        super().__init__(reason, detail)
        self.field = field
        self.extra: LedgerExtra = dict(extra or {})

    def body(self) -> LedgerExtra:
        """The JSON error body: ``{"error": reason, "field"?, "detail"?, **extra}``."""
        doc: LedgerExtra = {"error": self.reason}
        if self.field is not None:
            doc["field"] = self.field
        if self.detail:
            doc["detail"] = self.detail
        doc.update(self.extra)
        return doc


class LedgerInputError(LedgerError):
    """400: the request cannot be parsed or breaks a format (``invalid_json``, ``unknown_field``,
    ``missing_amount``, ``invalid_amount``, ``invalid_vcpu_hours``, ``invalid_price``,
    ``invalid_period``, ``invalid_account_id``, ``invalid_node_id``,
    ``invalid_idempotency_key``, ``missing_idempotency_key``, ``accounts_must_be_different``,
    ``amount_rounds_to_zero``, ``period_in_future``, ``period_too_old``,
    ``abuse_span_too_long``, ``invalid_action``, ``invalid_decision``, ``missing_fields``).
    Decided before any transaction, so never stored for idempotency."""

    http_status = 400


class BodyTooLargeError(LedgerInputError):
    """413 ``body_too_large``: a ledger request body over its limit (16 KiB)."""

    http_status = 413


class LedgerNotFoundError(LedgerError):
    """404: ``account_not_found``, ``node_not_found``, ``report_not_found``,
    ``pending_transfer_not_found``. Stored for idempotency like a conflict."""

    http_status = 404


class LedgerConflictError(LedgerError):
    """409, a business rejection after parsing: ``insufficient_funds``,
    ``idempotency_key_reused``, ``overflows_debits``, ``overflows_credits``,
    ``account_not_fundable``, ``period_not_ended``, ``period_finalized``, ``period_not_held``,
    ``usage_conflict``, ``usage_exceeds_capacity``, ``report_already_decided``,
    ``pending_transfer_already_posted``, ``pending_transfer_already_voided``, ... Stored for
    idempotency: a retry with the same key gets the same rejection."""

    http_status = 409

