//! A fresh schema of the test database (PostgreSQL on 127.0.0.1:5432, started by
//! scripts/deps.sh), for the stores that keep data there.

/// A schema of its own in the test database; [`Schema::drop_schema`] removes it.
pub struct Schema {
    pub name: String,
    pub client: tokio_postgres::Client,
}

impl Schema {
    /// Creates `{prefix}_{unique}`.
    pub async fn create(prefix: &str) -> Schema {
        let (client, conn) = tokio_postgres::connect(
            "postgres://postgres@127.0.0.1:5432/test",
            tokio_postgres::NoTls,
        )
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (scripts/deps.sh installs it)");
        tokio::spawn(conn);
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        client
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .unwrap();
        Schema { name, client }
    }

    /// The database URL that puts this schema first on the search path.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{}",
            self.name
        )
    }

    pub async fn drop_schema(&self) {
        self.client
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name))
            .await
            .unwrap();
    }
}
