"""The ledger's pure core: the rules of eecp's USD ledger as values and functions (issue 15).

Nothing in this package does I/O, holds a lock, starts a task or imports trio, peewee or quart.
Every rule of the specification (``ledger-spec.md``) that can be stated as a function of plain
values is here, tested synchronously in ``tests/ledger/`` the way h11 tests its state machine.
The store applies the same functions inside its transactions and the HTTP layer calls the same
parsers, so a rule exists once. By layer, ``eecp.ledger`` imports only the core (errors, clock,
config) and, later, ``store``; never agents, the data plane or the control plane (a test
checks it).

The map:

===================  =============================================================  ========
module               holds                                                          spec
===================  =============================================================  ========
``money``            integer micro-USD; :func:`~money.parse_json_body` (size,       §2
                     duplicate keys, NaN, numbers kept as text);
                     :func:`~money.parse_usd`, the one amount grammar with its
                     stable ``detail`` list; exact rendering, ``balance_cents``;
                     usage rounding (half-up), the platform fee (floor)
``periods``          the UTC grid (``hour``/``day``/N seconds), period ids,         §6,
                     RFC 3339 bounds with ``invalid_period`` details, reportable    §21.10
                     and settleable checks, ``EE_LEDGER_PERIOD``
``journal``          account ids and kinds, the four counters, transfer codes,     §3
                     :func:`~journal.apply` (one transfer: new balances or a
                     ``LedgerError``), linked batches, the §3.3 invariants, and
                     :class:`~journal.Journal`, the in-memory reference model
``idempotency``      ``Idempotency-Key`` rules, the request fingerprint, replay /   §4
                     reuse conflict / store-or-not
``availability``     :func:`~availability.measure`: a node-period's counted         §8.3
                     downtime, gaps and carry-out from events and heartbeats
``eligibility``      :func:`~eligibility.judge`: pass / fail / held with every      §9.2
                     reason
``settlement``       :func:`~settlement.plan_settlement` (post/void/fee, totals,    §9.3,
                     its transfers), capacity, minimum stake, the abuse rule        §11
===================  =============================================================  ========

How the later modules use it:

- ``store/ledger_repo.py`` runs each operation as one database transaction. It locks the
  ``node_period`` row, then the account rows in id order; builds :class:`~journal.Balances`
  from them; calls :func:`~journal.apply` / :func:`~journal.apply_linked` and writes the
  absolute counters it returns with the transfer rows (``UNIQUE(pending_id)`` and the CHECKs
  back the same rules up). It claims the idempotency key in the same transaction, answering
  :func:`~idempotency.decide` with the stored :class:`~idempotency.StoredAnswer` and keeping
  answers :func:`~idempotency.should_store` allows. To settle, it reads the previous
  ``node_period.carry_out`` (:meth:`~availability.Carry.from_json`), that period's events and
  the observer rows, runs :func:`~availability.measure`, :func:`~settlement.abuse_effect`,
  :func:`~eligibility.judge` per app and :func:`~settlement.plan_settlement`, then applies
  :meth:`~settlement.SettlementPlan.transfers`. ``GET /v1/ledger/check`` reports
  :func:`~journal.check_invariants`, :func:`~journal.journal_mismatches` and
  :func:`~journal.resolution_violations`.
- ``control/ledger_api.py`` parses the body once (:func:`~money.parse_json_body`,
  :func:`~money.reject_unknown_fields`). It then parses fields with
  :func:`~money.parse_amount_fields`, :func:`~journal.parse_account_id` and
  :func:`~periods.period_from_fields`, checks :func:`~periods.check_reportable`, and reads the
  key with :func:`~idempotency.parse_key`. The normalized request is hashed with
  :func:`~idempotency.fingerprint`. A refusal is answered with ``LedgerError.body()`` and its
  ``http_status``, and amounts are rendered with :func:`~money.format_usd` and
  :func:`~money.balance_cents`.
- The settler job takes due periods from :func:`~periods.check_settleable`, and the config
  reads ``EE_LEDGER_PERIOD`` (:func:`~periods.period_setting`, then
  :func:`~periods.check_period_settings`), ``EE_PLATFORM_FEE_BPS``
  (:func:`~money.fee_bps_setting`) and ``EE_LEDGER_MAX_AMOUNT_USD``
  (:func:`~money.max_amount_setting`).
"""
