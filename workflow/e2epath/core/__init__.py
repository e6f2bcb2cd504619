"""What every stage may ask: the words (`vocabulary`), where results go (`layout`), atomic files
(`io`), seeds (`seeds`), the config schema (`schema`), devices (`devices`), and the metrics and
predictions tables shared by training and evaluation (`metrics`, `predictions`)."""
