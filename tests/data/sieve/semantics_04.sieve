require ["reject"]; redirect "a@v.example"; reject "no";
