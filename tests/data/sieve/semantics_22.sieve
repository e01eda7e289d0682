redirect "a@v.example"; redirect "A@v.example"; redirect "b@v.example"; redirect "c@v.example"; redirect "d@v.example";
