"""The sandboxes themselves: RDS-like admins, and cleanup that leaves nothing behind."""

from psycopg import sql

from tests import servers


def test_mysql_admin_is_rds_like_and_app_logs_in(mysql_box):
    admin = mysql_box.connect(mysql_box.admin_user, mysql_box.admin_password)
    with admin.cursor() as cur:
        cur.execute("SELECT Super_priv, Grant_priv FROM mysql.user WHERE User = %s",
                    (mysql_box.admin_user,))
        assert cur.fetchone() == ("N", "Y")
    app = mysql_box.connect(mysql_box.app_user, mysql_box.app_password, mysql_box.database)
    with app.cursor() as cur:
        cur.execute("SELECT DATABASE()")
        assert cur.fetchone() == (mysql_box.database,)


def test_mysql_cleanup_drops_users_and_databases():
    box = servers.mysql_sandbox()
    servers.drop_mysql_sandbox(box)
    with box.root().cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM mysql.user WHERE User LIKE %s", (box.prefix + "%",))
        assert cur.fetchone() == (0,)
        cur.execute("SHOW DATABASES LIKE %s", (box.prefix + "%",))
        assert cur.fetchall() == ()


def test_postgres_admin_is_rds_like(postgres_box):
    conn = postgres_box.connect(postgres_box.admin_user, postgres_box.admin_password)
    row = conn.execute("SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
                       "WHERE rolname = current_user").fetchone()
    assert row == (False, True, True)


def test_postgres_cleanup_drops_roles_and_databases():
    box = servers.postgres_sandbox()
    app = box.connect(box.app_user, box.app_password)
    app.execute(sql.SQL("CREATE TABLE t (id int)"))
    app.close()
    servers.drop_postgres_sandbox(box)
    conn = box.root()
    assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE %s",
                        (box.prefix + "%",)).fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE %s",
                        (box.prefix + "%",)).fetchone() == (0,)
