//! End-to-end tests: the four services booted in this process on free ports, each with its own
//! database and a link of its own to the real RabbitMQ (in a namespace per test), driven through
//! the gateway over HTTP exactly as a client would.
//!
//! | module | what it shows |
//! |---|---|
//! | [`orders`] | placing, reading, refusing, replaying and cancelling orders |
//! | [`correlation`] | one correlation ID through every HTTP and AMQP hop's log lines |
//! | [`resilience`] | a dead, a hanging and a flaky dependency: bounded answers, breakers, recovery |
//! | [`messaging`] | events reaching their consumers, the price cache, a cut broker link |
//! | [`durability`] | restarts, a crash between commit and publish, a broker outage |

mod helpers;

mod correlation;
mod durability;
mod messaging;
mod orders;
mod resilience;
