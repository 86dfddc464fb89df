//! Starts pricing-service.

use anyhow::Context;
use pricing_service::SERVICE;
use pricing_service::config::Settings;
use pricing_service::startup::Application;
use shared::config::Env;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = Env::from_process();
    let _log_guard = shared::telemetry::init_stdout(SERVICE, &env)?;
    let settings = Settings::from_env(&env).context("reading settings")?;
    Application::build(settings)
        .await?
        .run_until_stopped()
        .await
}
