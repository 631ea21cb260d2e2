"""eecp's USD ledger (issues 15 and 16): a pure core of rules, and the service that applies
them to the store.

**The pure core** (``money``, ``periods``, ``journal``, ``idempotency``, ``availability``,
``eligibility``, ``settlement``, ``stake``, ``trust``, ``routing``) does no I/O, holds no lock,
starts no task and imports neither trio nor the store. Every rule of the specification
(``ledger-spec.md``) that can be stated as a function of plain values is there, tested
synchronously in ``tests/ledger/`` the way h11 tests its state machine. **The service**
(``answers``, ``units``, ``credits``, ``usage``, ``nodes``, ``observe``, ``abuse``,
``settle``, ``slashing``, ``staking``, ``placement``, ``service``, ``jobs``) runs those same
functions inside the store's units of work, so a rule exists once. By layer, ``eecp.ledger``
imports the core and the store's API (plain records; never peewee); never agents, the data
plane or the control plane (a test checks it). The agents' registry may import
:mod:`eecp.ledger.routing` (it is below them) for the proxy's pick.

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
``stake``            the tiers (exact allowances, penalties), the slash window and  §10
                     its restart, the slash amount and the unstakes it voids,
                     unstake limits, the releaser's choice, fraud signals and
                     evidence, statuses
``trust``            the history factor, the effective price, placement's query,    §12
                     filter and order
``routing``          :func:`~routing.rank`, the proxy's pick: today's order with    §12
                     nothing bound; else banned/suspended out, the price band, load
===================  =============================================================  ========

The service:

===================  =============================================================  ========
module               holds                                                          spec
===================  =============================================================  ========
``service``          :class:`~service.Ledger`: one async call per endpoint of §13,  §13
                     the writers the sessions call, the settler's pass
``answers``          :class:`~answers.Answer` (status, exact body bytes, replayed), §13,
                     :class:`~answers.LedgerSettings`, refusals as answers          §16
``units``            a unit of work's key claim with its effect and stored answer;  §4.2,
                     :func:`~units.move`, transfers over accounts locked in id      §3
                     order
``credits``          purchase, transfer, redeem, balances, the check               §3, §21.6
``usage``            usage reports: a hold at the period's posted price             §9.1
``nodes``            register (terms schedule, stake target, token), node view      §7.2–7.4
``observe``          availability events, observer beats, platform claims and       §7.1, §8
                     confirmations, agent release
``abuse``            filing and deciding abuse reports                              §11
``settle``           measuring node-period chains, settling one node-period in one  §8.3,
                     unit of work, the settler's due list                           §9.3, §15
``slashing``         the availability slash in the unit that measures a period,     §10.2,
                     what a slash writes, the trust cache                           §12
``staking``          unstake and its release, status, fraud signals, the ban        §10.3–4
``placement``        the node view, the placement list, the proxy's node views,     §7.4, §12,
                     the stake figures for metrics                                  §15
``outbox``           the sessions' availability events on their way to the store:   §8.2
                     bounded, counted drops, the observer's beats tied to it
``jobs``             the observer, settler and metrics loops (trio)                 §15
===================  =============================================================  ========

The HTTP layer (:mod:`eecp.control.ledger_api`) authenticates the caller, checks the role
matrix of §5, turns a node token into its principal (:meth:`~service.Ledger.node_for_token`),
passes the path, the raw body and the ``Idempotency-Key`` values to one ``Ledger`` method and
writes the :class:`~answers.Answer` it returns. The sessions reach the ledger through
:class:`eecp.agents.ledger_hooks.SessionLedger` (:class:`~outbox.SessionWriter`), the
attestation engine through :meth:`~service.Ledger.platform_banned`; :mod:`eecp.wiring` builds
all of it only with ``EE_LEDGER_ENABLED=true``.
"""
