from tasks.promote.stage import app

app()
