"""The database layer: models, migrations, the embedded server and every SQL statement."""
