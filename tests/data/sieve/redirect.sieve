redirect "alice@v.example";
