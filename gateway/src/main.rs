//! Starts the gateway: read the environment, set up logging, build and serve until a signal.

use gateway::SERVICE;
use gateway::config::Settings;
use gateway::startup::Application;
use shared::config::Env;
use shared::telemetry;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = Env::from_process();
    let _log_guard = telemetry::init_stdout(SERVICE, &env)?;
    let settings = Settings::from_env(&env)?;
    Application::build(settings)
        .await?
        .run_until_stopped()
        .await
}
